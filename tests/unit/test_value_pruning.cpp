// Local value pruning (SpAtten, Method::value_pruning): the CPU kernel on
// crafted rows (ties, renormalization, keep 1 = exact attention), and the
// engine: every key still scored, the V rows of the others not read (the
// traffic counters say so), close to dense when nearly every value is kept.
#include <gtest/gtest.h>

#include <cmath>
#include <numeric>
#include <vector>

#include "cpu/cpu_ops.h"
#include "engine/engine.h"
#include "inferlab/testing.h"

namespace inferlab {
namespace test_value_pruning {

namespace cpu = kernels::cpu;

// One page of keys and values (n, head_dim) as float rows.
struct Rows {
  std::vector<float> k, v;
  cpu::KvPageRef page() const { return {k.data(), v.data(), int32_t(k.size() / 2), kernels::DType::F32}; }
};

TEST(ValuePruning, KeepsTheMostProbableKeysTiesToTheEarlier) {
  // head_dim 2, q = (1, 0): scores are the keys' first components.
  Rows r;
  r.k = {0, 0, 2, 0, 1, 0, 2, 0, 2, 0};  // scores 0, 2, 1, 2, 2
  r.v = {1, 0, 10, 0, 100, 0, 1000, 0, 10000, 0};
  const float q[2] = {1, 0};
  const auto page = r.page();
  std::vector<float> probs(5), out(2);
  std::vector<uint8_t> kept(5);
  // 2 of 5: the three keys scoring 2 tie; the earlier two (1 and 3) stay.
  EXPECT_EQ(cpu::attention_row_value_topk(q, &page, 1, 5, 2, 1.0f, 0.4, false, out.data(), probs.data(), kept.data()),
            2);
  EXPECT_EQ(kept, (std::vector<uint8_t>{0, 1, 0, 1, 0}));
  const float e0 = 1.0f, e2 = std::exp(2.0f), e1 = std::exp(1.0f), sum = e0 + 3 * e2 + e1;
  EXPECT_NEAR(std::accumulate(probs.begin(), probs.end(), 0.0), 1.0, 1e-6);
  EXPECT_NEAR(probs[1], e2 / sum, 1e-6);
  EXPECT_NEAR(out[0], (10 + 1000) * e2 / sum, 1e-3);  // the kept probabilities as they are
  // Renormalized: the two kept probabilities are equal, each 1/2.
  cpu::attention_row_value_topk(q, &page, 1, 5, 2, 1.0f, 0.4, true, out.data(), probs.data(), kept.data());
  EXPECT_NEAR(out[0], (10 + 1000) / 2.0, 1e-3);
  // At least one value, and only the visible keys: the first three, keep 0.01 -> the best of them.
  EXPECT_EQ(cpu::attention_row_value_topk(q, &page, 1, 3, 2, 1.0f, 0.01, false, out.data(), probs.data(), kept.data()),
            1);
  EXPECT_EQ((std::vector<uint8_t>(kept.begin(), kept.begin() + 3)), (std::vector<uint8_t>{0, 1, 0}));
}

TEST(ValuePruning, KeepingEveryValueIsExactAttention) {
  const int64_t n = 37, hd = 16;
  Rows r;
  r.k.resize(size_t(n * hd));
  r.v.resize(size_t(n * hd));
  uint64_t state = 3;
  auto next = [&] {
    state = state * 6364136223846793005ull + 1442695040888963407ull;
    return float(int64_t(state >> 40) % 2001 - 1000) / 500.0f;
  };
  for (auto& x : r.k) x = next();
  for (auto& x : r.v) x = next();
  std::vector<float> q(static_cast<size_t>(hd));
  for (auto& x : q) x = next();
  const cpu::KvPageRef page{r.k.data(), r.v.data(), int32_t(n), kernels::DType::F32};
  std::vector<float> want(static_cast<size_t>(hd)), got(static_cast<size_t>(hd)), probs(static_cast<size_t>(n));
  const int32_t visible = int32_t(n);
  cpu::attention_paged(q.data(), 1, hd, &page, 1, &visible, hd, 0.25f, want.data(), hd, nullptr);
  EXPECT_EQ(cpu::attention_row_value_topk(q.data(), &page, 1, n, hd, 0.25f, 1.0, false, got.data(), probs.data(),
                                          nullptr),
            n);
  EXPECT_LT(test::normalized_max_error(got, want), 1e-6);
}

// A method with nothing but value pruning.
class ValueMethod final : public Method {
 public:
  explicit ValueMethod(double keep) : keep_(keep) {}
  ValuePruning value_pruning() const override { return {keep_, false}; }

 private:
  double keep_;
};

TEST(ValuePruning, TheEngineReadsOnlyTheKeptValues) {
  auto model = test::gqa_test_model("value-pruning", 4);
  const auto prompt = test::random_tokens(model->config().n_vocab, 60, 2);
  auto engine = Engine::create(model, EngineOptions{.page_size = 4});
  ASSERT_TRUE(engine.ok());
  const test::ForwardTrace dense = test::run_trace(**engine, nullptr, prompt, 10);
  const EngineCounters dense_counters = (*engine)->counters();
  for (double keep : {0.999999, 0.3}) {
    ValueMethod method(keep);
    ASSERT_TRUE((*engine)->set_method(&method, 0).ok());
    (*engine)->reset_counters();
    const test::ForwardTrace got = test::run_trace(**engine, &method, prompt, 10, dense.tokens);
    const EngineCounters& counted = (*engine)->counters();
    (void)(*engine)->set_method(nullptr, 0);
    EXPECT_EQ(counted.decode_keys_read, dense_counters.decode_keys_read);
    const double error = test::normalized_max_error(got.logits, dense.logits);
    if (keep > 0.99) {  // ceil(keep * n) = n: every value, other arithmetic
      EXPECT_LT(error, 1e-5);
      EXPECT_EQ(counted.decode_values_skipped, 0);
      EXPECT_EQ(counted.decode_kv_bytes_read, dense_counters.decode_kv_bytes_read);
    } else {
      EXPECT_GT(error, 1e-4) << "pruning 70% of the values changed nothing";
      EXPECT_GT(counted.decode_values_skipped, 0);
      // Every K row is read; the skipped V rows are not.
      const int64_t row = (*engine)->pool().token_bytes() / 2;
      EXPECT_EQ(counted.decode_kv_bytes_read, dense_counters.decode_kv_bytes_read - counted.decode_values_skipped * row);
    }
  }
}

}  // namespace test_value_pruning
}  // namespace inferlab
