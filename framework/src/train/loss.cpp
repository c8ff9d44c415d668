// The losses (class-balanced BCE with logits, softmax cross-entropy) and the
// positive weights balanced BCE uses.
#include <algorithm>
#include <cmath>
#include <string>

#include "inferlab/train.h"

namespace inferlab::train {
namespace {

// log(1 + e^t) without overflow; -softplus(-z) is log sigmoid(z).
double softplus(double t) { return std::max(t, 0.0) + std::log1p(std::exp(-std::abs(t))); }

double sigmoid(double z) {
  if (z >= 0) return 1.0 / (1.0 + std::exp(-z));
  const double e = std::exp(z);
  return e / (1.0 + e);
}

Status check_shape(const char* loss, size_t logits, size_t targets, int64_t out, int64_t rows) {
  if (out <= 0 || logits % static_cast<size_t>(out) != 0 || targets != static_cast<size_t>(rows))
    return Error{std::string(loss) + ": " + std::to_string(logits) + " logits of width " + std::to_string(out) +
                 " do not match " + std::to_string(targets) + " targets"};
  return ok_status();
}

}  // namespace

Result<LossOutput> balanced_bce(std::span<const float> logits, std::span<const uint8_t> targets, int64_t out,
                                std::span<const float> pos_weight) {
  if (auto st = check_shape("balanced BCE", logits.size(), targets.size(), out, static_cast<int64_t>(logits.size()));
      !st)
    return st.error();
  if (!pos_weight.empty() && static_cast<int64_t>(pos_weight.size()) != out)
    return Error{"balanced BCE: " + std::to_string(pos_weight.size()) + " positive weights for " +
                 std::to_string(out) + " outputs"};
  LossOutput result;
  result.dlogits.resize(logits.size());
  if (logits.empty()) return result;
  const double scale = 1.0 / static_cast<double>(logits.size());
  double total = 0;
  for (size_t i = 0; i < logits.size(); ++i) {
    const double z = logits[i];
    const double w = pos_weight.empty() ? 1.0 : pos_weight[i % static_cast<size_t>(out)];
    const bool positive = targets[i] != 0;
    total += positive ? w * softplus(-z) : softplus(z);
    const double s = sigmoid(z);
    result.dlogits[i] = static_cast<float>((positive ? w * (s - 1.0) : s) * scale);
  }
  result.loss = total * scale;
  return result;
}

Result<LossOutput> softmax_cross_entropy(std::span<const float> logits, std::span<const int32_t> classes,
                                         int64_t out) {
  const int64_t rows = out > 0 ? static_cast<int64_t>(logits.size()) / out : 0;
  if (auto st = check_shape("softmax cross-entropy", logits.size(), classes.size(), out, rows); !st)
    return st.error();
  LossOutput result;
  result.dlogits.resize(logits.size());
  if (rows == 0) return result;
  const double scale = 1.0 / static_cast<double>(rows);
  double total = 0;
  for (int64_t r = 0; r < rows; ++r) {
    const int32_t c = classes[static_cast<size_t>(r)];
    if (c < 0 || c >= out)
      return Error{"softmax cross-entropy: class " + std::to_string(c) + " of row " + std::to_string(r) +
                   " is outside [0, " + std::to_string(out) + ")"};
    const float* z = logits.data() + r * out;
    float* g = result.dlogits.data() + r * out;
    const double top = *std::max_element(z, z + out);
    double sum = 0;
    for (int64_t j = 0; j < out; ++j) sum += std::exp(z[j] - top);
    total += top + std::log(sum) - z[c];
    for (int64_t j = 0; j < out; ++j)
      g[j] = static_cast<float>((std::exp(z[j] - top) / sum - (j == c ? 1.0 : 0.0)) * scale);
  }
  result.loss = total * scale;
  return result;
}

std::vector<float> positive_weights(std::span<const uint8_t> labels, int64_t out, PositiveWeight mode,
                                    std::span<const int64_t> rows) {
  std::vector<float> w(static_cast<size_t>(std::max<int64_t>(out, 0)), 1.0f);
  if (mode == PositiveWeight::kNone || out <= 0) return w;
  std::vector<int64_t> pos(w.size(), 0);
  const int64_t all = static_cast<int64_t>(labels.size()) / out;
  int64_t n = 0;  // rows counted (indices outside the labels are skipped)
  for (int64_t i = 0; i < (rows.empty() ? all : static_cast<int64_t>(rows.size())); ++i) {
    const int64_t r = rows.empty() ? i : rows[static_cast<size_t>(i)];
    if (r < 0 || r >= all) continue;
    ++n;
    const uint8_t* y = labels.data() + r * out;
    for (int64_t j = 0; j < out; ++j) pos[static_cast<size_t>(j)] += y[j] != 0;
  }
  const auto ratio = [](int64_t p, int64_t q) {
    return p > 0 && q > 0 ? static_cast<float>(static_cast<double>(q) / static_cast<double>(p)) : 1.0f;
  };
  if (mode == PositiveWeight::kGlobal) {
    int64_t p = 0;
    for (int64_t c : pos) p += c;
    std::fill(w.begin(), w.end(), ratio(p, n * out - p));
  } else {
    for (size_t j = 0; j < w.size(); ++j) w[j] = ratio(pos[j], n - pos[j]);
  }
  return w;
}

}  // namespace inferlab::train
