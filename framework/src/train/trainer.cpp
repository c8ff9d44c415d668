// The training loop: a seeded split and shuffles, mini-batches, AdamW,
// validation metrics per epoch, and early stopping on validation recall.
#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <random>
#include <string>

#include "inferlab/train.h"

namespace inferlab::train {
namespace {

constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();

Status check_setup(const LowRankHead& head, const Dataset& data, const TrainOptions& o) {
  auto fail = [](const std::string& what) -> Status { return Error{"train: " + what}; };
  const int64_t in = head.options().in, out = head.options().out;
  if (o.batch_size <= 0) return fail("batch_size must be positive, got " + std::to_string(o.batch_size));
  if (o.batch_size > std::numeric_limits<int>::max()) return fail("batch_size must fit in 32 bits");
  if (o.max_epochs <= 0) return fail("max_epochs must be positive, got " + std::to_string(o.max_epochs));
  if (o.patience < 0) return fail("patience must be >= 0, got " + std::to_string(o.patience));
  if (!(o.min_improvement >= 0)) return fail("min_improvement must be >= 0, got " + std::to_string(o.min_improvement));
  if (!(o.validation_fraction >= 0 && o.validation_fraction < 1))
    return fail("validation_fraction must be in [0, 1), got " + std::to_string(o.validation_fraction));
  if (o.top_k < 0 || o.top_k > out)
    return fail("top_k must be in [0, out = " + std::to_string(out) + "], got " + std::to_string(o.top_k));
  if (data.features.empty()) return fail("the dataset is empty (no features)");
  if (data.dim != in)
    return fail("the dataset has dim " + std::to_string(data.dim) + ", the head takes in " + std::to_string(in));
  if (data.features.size() % static_cast<size_t>(in) != 0)
    return fail(std::to_string(data.features.size()) + " features are not whole rows of dim " + std::to_string(in));
  const size_t rows = static_cast<size_t>(data.rows());
  if (o.loss == LossKind::kBalancedBce && data.labels.size() != rows * static_cast<size_t>(out))
    return fail("label width mismatch: " + std::to_string(data.labels.size()) + " labels for " +
                std::to_string(rows) + " rows of out " + std::to_string(out));
  if (o.loss == LossKind::kSoftmaxCrossEntropy && data.classes.size() != rows)
    return fail(std::to_string(data.classes.size()) + " classes for " + std::to_string(rows) + " rows");
  if (o.loss == LossKind::kSoftmaxCrossEntropy)
    for (size_t r = 0; r < rows; ++r)
      if (data.classes[r] < 0 || data.classes[r] >= out)
        return fail("class " + std::to_string(data.classes[r]) + " of row " + std::to_string(r) +
                    " is outside [0, " + std::to_string(out) + ")");
  return ok_status();
}

// Rows [begin, end) of `rows`, gathered contiguously.
struct Batch {
  std::vector<float> x;
  std::vector<uint8_t> labels;
  std::vector<int32_t> classes;
  void gather(const Dataset& data, const TrainOptions& o, int64_t out, std::span<const int64_t> rows) {
    const size_t dim = static_cast<size_t>(data.dim), width = static_cast<size_t>(out);
    x.resize(rows.size() * dim);
    for (size_t i = 0; i < rows.size(); ++i)
      std::copy_n(data.features.data() + static_cast<size_t>(rows[i]) * dim, dim, x.data() + i * dim);
    if (o.loss == LossKind::kBalancedBce) {
      labels.resize(rows.size() * width);
      for (size_t i = 0; i < rows.size(); ++i)
        std::copy_n(data.labels.data() + static_cast<size_t>(rows[i]) * width, width, labels.data() + i * width);
    } else {
      classes.resize(rows.size());
      for (size_t i = 0; i < rows.size(); ++i) classes[i] = data.classes[static_cast<size_t>(rows[i])];
    }
  }
};

Result<LossOutput> batch_loss(const Batch& b, const TrainOptions& o, std::span<const float> logits, int64_t out,
                              std::span<const float> pos_weight) {
  if (o.loss == LossKind::kBalancedBce) return balanced_bce(logits, b.labels, out, pos_weight);
  return softmax_cross_entropy(logits, b.classes, out);
}

// A uniform integer in [0, bound) by rejection, so that it is unbiased and the
// same on every platform (std::uniform_int_distribution's output is not).
uint64_t below(std::mt19937_64& rng, uint64_t bound) {
  const uint64_t threshold = (0 - bound) % bound;  // 2^64 mod bound
  for (;;)
    if (const uint64_t r = rng(); r >= threshold) return r % bound;
}

}  // namespace

void shuffle(std::vector<int64_t>& v, std::mt19937_64& rng) {
  for (size_t i = v.size(); i > 1; --i) std::swap(v[i - 1], v[below(rng, i)]);
}

Result<Metrics> evaluate(const LowRankHead& head, const Dataset& data, const TrainOptions& o,
                         std::span<const float> pos_weight, std::span<const int64_t> rows) {
  if (auto st = check_setup(head, data, o); !st) return st.error();
  const int64_t out = head.options().out, n = data.rows();
  std::vector<int64_t> all;
  if (rows.empty()) {
    all.resize(static_cast<size_t>(n));
    std::iota(all.begin(), all.end(), int64_t{0});
    rows = all;
  }
  for (int64_t r : rows)
    if (r < 0 || r >= n) return Error{"train: evaluate got row " + std::to_string(r) + " of " + std::to_string(n)};
  Batch b;
  std::vector<float> logits;
  std::vector<int32_t> order(static_cast<size_t>(out));
  double loss = 0, recall = 0, precision = 0;
  int64_t scored = 0;  // rows with at least one positive (every row for cross-entropy)
  for (size_t begin = 0; begin < rows.size(); begin += static_cast<size_t>(o.batch_size)) {
    const auto batch = rows.subspan(begin, std::min(rows.size() - begin, static_cast<size_t>(o.batch_size)));
    b.gather(data, o, out, batch);
    logits.resize(batch.size() * static_cast<size_t>(out));
    if (auto st = head.forward(b.x, logits); !st) return st.error();
    auto l = batch_loss(b, o, logits, out, pos_weight);
    if (!l) return l.error();
    loss += l->loss * static_cast<double>(batch.size());
    for (size_t i = 0; i < batch.size(); ++i) {
      const float* z = logits.data() + i * static_cast<size_t>(out);
      // Larger logits first, NaN last, ties by index: a strict total order.
      const auto key = [z](int32_t j) { return std::isnan(z[j]) ? -std::numeric_limits<float>::infinity() : z[j]; };
      const auto before = [&](int32_t a, int32_t c) { return key(a) > key(c) || (key(a) == key(c) && a < c); };
      if (o.loss == LossKind::kSoftmaxCrossEntropy) {
        int32_t best = 0;
        for (int32_t j = 1; j < out; ++j)
          if (before(j, best)) best = j;
        const double hit = best == b.classes[i] ? 1.0 : 0.0;
        recall += hit;
        precision += hit;
        ++scored;
        continue;
      }
      const uint8_t* y = b.labels.data() + i * static_cast<size_t>(out);
      const int64_t positives = std::count_if(y, y + out, [](uint8_t v) { return v != 0; });
      if (positives == 0) continue;
      const int64_t k = o.top_k > 0 ? o.top_k : positives;
      std::iota(order.begin(), order.end(), 0);
      std::nth_element(order.begin(), order.begin() + (k - 1), order.end(), before);
      const int64_t hits = std::count_if(order.begin(), order.begin() + k, [y](int32_t j) { return y[j] != 0; });
      recall += static_cast<double>(hits) / static_cast<double>(positives);
      precision += static_cast<double>(hits) / static_cast<double>(k);
      ++scored;
    }
  }
  const double s = scored > 0 ? 1.0 / static_cast<double>(scored) : kNaN;
  return Metrics{loss / static_cast<double>(rows.size()), recall * s, precision * s};
}

Result<TrainReport> train(LowRankHead& head, const Dataset& data, const TrainOptions& o) {
  if (auto st = check_setup(head, data, o); !st) return st.error();
  auto optimizer = AdamW::create(o.adamw);
  if (!optimizer) return Error{"train: " + optimizer.message()};
  const int64_t n = data.rows(), out = head.options().out;

  TrainReport report;
  std::mt19937_64 rng(o.seed);
  std::vector<int64_t> order(static_cast<size_t>(n));
  std::iota(order.begin(), order.end(), int64_t{0});
  shuffle(order, rng);
  int64_t n_val = std::llround(o.validation_fraction * static_cast<double>(n));
  if (o.validation_fraction > 0 && n_val == 0) n_val = 1;
  if (n_val >= n)
    return Error{"train: validation_fraction " + std::to_string(o.validation_fraction) + " of " +
                 std::to_string(n) + " rows leaves no training rows"};
  report.validation_rows.assign(order.begin(), order.begin() + n_val);
  report.train_rows.assign(order.begin() + n_val, order.end());
  std::sort(report.validation_rows.begin(), report.validation_rows.end());
  std::sort(report.train_rows.begin(), report.train_rows.end());
  if (o.loss == LossKind::kBalancedBce)
    report.pos_weight = positive_weights(data.labels, out, o.positive_weight, report.train_rows);

  std::vector<int64_t> epoch_order = report.train_rows;
  LowRankHead best = head;
  double best_recall = -std::numeric_limits<double>::infinity();
  int32_t since_best = 0;
  Batch b;
  Activations kept;
  HeadGradients grads;
  std::vector<float> logits;
  for (int32_t epoch = 0; epoch < o.max_epochs; ++epoch) {
    shuffle(epoch_order, rng);
    double loss = 0;
    for (size_t begin = 0; begin < epoch_order.size(); begin += static_cast<size_t>(o.batch_size)) {
      const auto batch = std::span<const int64_t>(epoch_order).subspan(
          begin, std::min(epoch_order.size() - begin, static_cast<size_t>(o.batch_size)));
      b.gather(data, o, out, batch);
      logits.resize(batch.size() * static_cast<size_t>(out));
      if (auto st = head.forward(b.x, logits, &kept); !st) return st.error();
      auto l = batch_loss(b, o, logits, out, report.pos_weight);
      if (!l) return Error{"train: " + l.message()};
      loss += l->loss * static_cast<double>(batch.size());
      if (auto st = head.backward(b.x, kept, l->dlogits, grads); !st) return st.error();
      if (auto st = optimizer->step(parameters(head, grads)); !st) return st.error();
    }
    EpochMetrics m{epoch, loss / static_cast<double>(epoch_order.size()), {kNaN, kNaN, kNaN}};
    if (n_val > 0) {
      auto v = evaluate(head, data, o, report.pos_weight, report.validation_rows);
      if (!v) return v.error();
      m.validation = *v;
    }
    report.epochs.push_back(m);
    if (n_val == 0) {
      report.best_epoch = epoch;
      continue;
    }
    // The first epoch is the best so far even when its recall is NaN (no row with a positive).
    if (epoch == 0 || m.validation.recall > best_recall + o.min_improvement) {
      best_recall = m.validation.recall;
      report.best_epoch = epoch;
      best = head;
      since_best = 0;
    } else if (++since_best >= o.patience && o.patience > 0) {
      report.stopped_early = true;
      break;
    }
  }
  if (n_val > 0) head = std::move(best);
  return report;
}

}  // namespace inferlab::train
