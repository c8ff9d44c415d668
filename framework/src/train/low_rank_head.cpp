// LowRankHead: parameters, initialisation, and the batched forward and
// backward passes (OpenBLAS sgemm, row-major).
#include <cblas.h>

#include <climits>
#include <cmath>
#include <random>
#include <string>

#include "inferlab/train.h"

namespace inferlab::train {
namespace {

Status check_options(const HeadOptions& o) {
  auto fail = [](const std::string& what) -> Status { return Error{"train head: " + what}; };
  if (o.in <= 0) return fail("in must be positive, got " + std::to_string(o.in));
  if (o.out <= 0) return fail("out must be positive, got " + std::to_string(o.out));
  if (o.rank < 0) return fail("rank must be 0 (a linear head) or positive, got " + std::to_string(o.rank));
  if (o.relu && o.rank == 0) return fail("relu needs a hidden layer (rank > 0)");
  if (o.in > INT_MAX || o.out > INT_MAX || o.rank > INT_MAX) return fail("in, rank and out must fit in 32 bits");
  return ok_status();
}

// A float uniform in [-bound, bound) from the top 24 bits of one draw.
void fill_uniform(std::vector<float>& v, int64_t fan_in, std::mt19937_64& rng) {
  const float bound = 1.0f / std::sqrt(static_cast<float>(fan_in));
  for (float& x : v) x = (static_cast<float>(rng() >> 40) * 0x1.0p-24f * 2.0f - 1.0f) * bound;
}

void gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, const float* a, int64_t lda,
          const float* b, int64_t ldb, float* c, int64_t ldc) {
  if (m == 1 && !trans_a) {  // one row (a predictor at decode): a GEMV, without GEMM's packing of b
    cblas_sgemv(CblasRowMajor, trans_b ? CblasNoTrans : CblasTrans, static_cast<int>(trans_b ? n : k),
                static_cast<int>(trans_b ? k : n), 1.0f, b, static_cast<int>(ldb), a, 1, 0.0f, c, 1);
    return;
  }
  cblas_sgemm(CblasRowMajor, trans_a ? CblasTrans : CblasNoTrans, trans_b ? CblasTrans : CblasNoTrans,
              static_cast<int>(m), static_cast<int>(n), static_cast<int>(k), 1.0f, a, static_cast<int>(lda), b,
              static_cast<int>(ldb), 0.0f, c, static_cast<int>(ldc));
}

}  // namespace

Result<LowRankHead> LowRankHead::create(const HeadOptions& options, uint64_t seed) {
  if (auto st = check_options(options); !st) return st.error();
  LowRankHead head;
  head.options_ = options;
  std::mt19937_64 rng(seed);
  if (options.rank > 0) {
    head.w1_.resize(static_cast<size_t>(options.rank * options.in));
    fill_uniform(head.w1_, options.in, rng);
  }
  head.w2_.resize(static_cast<size_t>(options.out * head.hidden()));
  fill_uniform(head.w2_, head.hidden(), rng);
  if (options.bias) {
    head.b2_.resize(static_cast<size_t>(options.out));
    fill_uniform(head.b2_, head.hidden(), rng);
  }
  return head;
}

Result<LowRankHead> LowRankHead::from_parameters(const HeadOptions& options, std::vector<float> w1,
                                                 std::vector<float> w2, std::vector<float> b2) {
  if (auto st = check_options(options); !st) return st.error();
  LowRankHead head;
  head.options_ = options;
  const auto want = [](int64_t n) { return static_cast<size_t>(n); };
  if (w1.size() != want(options.rank * options.in) || w2.size() != want(options.out * head.hidden()) ||
      b2.size() != want(options.bias ? options.out : 0))
    return Error{"train head: parameter sizes " + std::to_string(w1.size()) + ", " + std::to_string(w2.size()) +
                 ", " + std::to_string(b2.size()) + " do not match in " + std::to_string(options.in) + ", rank " +
                 std::to_string(options.rank) + ", out " + std::to_string(options.out)};
  head.w1_ = std::move(w1);
  head.w2_ = std::move(w2);
  head.b2_ = std::move(b2);
  return head;
}

Status LowRankHead::forward(std::span<const float> x, std::span<float> logits, Activations* keep) const {
  const int64_t in = options_.in, out = options_.out, h = hidden();
  const int64_t rows = static_cast<int64_t>(x.size()) / in;
  if (static_cast<int64_t>(x.size()) != rows * in || static_cast<int64_t>(logits.size()) != rows * out)
    return Error{"train head: forward got " + std::to_string(x.size()) + " inputs and " +
                 std::to_string(logits.size()) + " logits for in " + std::to_string(in) + ", out " +
                 std::to_string(out)};
  if (rows == 0) return ok_status();
  const float* hidden_ptr = x.data();
  Activations local;
  if (options_.rank > 0) {
    Activations& a = keep ? *keep : local;
    a.hidden.resize(static_cast<size_t>(rows * h));
    gemm(false, true, rows, h, in, x.data(), in, w1_.data(), in, a.hidden.data(), h);
    if (options_.relu)
      for (float& v : a.hidden) v = v > 0.0f ? v : 0.0f;
    hidden_ptr = a.hidden.data();
  } else if (keep) {
    keep->hidden.clear();
  }
  gemm(false, true, rows, out, h, hidden_ptr, h, w2_.data(), h, logits.data(), out);
  if (options_.bias)
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t j = 0; j < out; ++j) logits[static_cast<size_t>(r * out + j)] += b2_[static_cast<size_t>(j)];
  return ok_status();
}

Status LowRankHead::backward(std::span<const float> x, const Activations& kept, std::span<const float> dlogits,
                             HeadGradients& grads) const {
  const int64_t in = options_.in, out = options_.out, h = hidden();
  const int64_t rows = static_cast<int64_t>(x.size()) / in;
  const bool low_rank = options_.rank > 0;
  if (static_cast<int64_t>(x.size()) != rows * in || static_cast<int64_t>(dlogits.size()) != rows * out ||
      (low_rank && static_cast<int64_t>(kept.hidden.size()) != rows * h))
    return Error{"train head: backward got " + std::to_string(x.size()) + " inputs, " +
                 std::to_string(dlogits.size()) + " gradients and " + std::to_string(kept.hidden.size()) +
                 " activations, which do not match one batch for in " + std::to_string(in) + ", rank " +
                 std::to_string(options_.rank) + ", out " + std::to_string(out)};
  grads.w1.assign(w1_.size(), 0.0f);
  grads.w2.assign(w2_.size(), 0.0f);
  grads.b2.assign(b2_.size(), 0.0f);
  if (rows == 0) return ok_status();
  const float* hidden_ptr = low_rank ? kept.hidden.data() : x.data();
  gemm(true, false, out, h, rows, dlogits.data(), out, hidden_ptr, h, grads.w2.data(), h);
  if (options_.bias)
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t j = 0; j < out; ++j) grads.b2[static_cast<size_t>(j)] += dlogits[static_cast<size_t>(r * out + j)];
  if (!low_rank) return ok_status();
  std::vector<float> dhidden(static_cast<size_t>(rows * h));
  gemm(false, false, rows, h, out, dlogits.data(), out, w2_.data(), h, dhidden.data(), h);
  if (options_.relu)
    for (size_t i = 0; i < dhidden.size(); ++i)
      if (kept.hidden[i] <= 0.0f) dhidden[i] = 0.0f;
  gemm(true, false, h, in, rows, dhidden.data(), h, x.data(), in, grads.w1.data(), in);
  return ok_status();
}

std::vector<Parameter> parameters(LowRankHead& head, const HeadGradients& grads) {
  std::vector<Parameter> out;
  if (!head.w1().empty()) out.push_back({head.w1(), grads.w1});
  out.push_back({head.w2(), grads.w2});
  if (!head.b2().empty()) out.push_back({head.b2(), grads.b2});
  return out;
}

}  // namespace inferlab::train
