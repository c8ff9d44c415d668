// Bit-plane KV pages (SpAtten's progressive quantization, Method::kv_quantization):
// the row codec (round trip on the grid, the MSB bucket's middle, every
// width, the scalar reader the device shares against the host decoder), the
// kernels reading bit-plane pages as their decoded rows, and the engine: a
// method's sequences in a pool of its planes (bytes per page), the refetch
// decision at the threshold, the traffic counters, and bad widths refused.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <map>
#include <tuple>
#include <vector>

#include "cpu/attention_tiled.h"
#include "cpu/cpu_ops.h"
#include "engine/engine.h"
#include "engine/kv_cache.h"
#include "inferlab/testing.h"

namespace inferlab {
namespace test_bit_planes {

namespace cpu = kernels::cpu;
using kernels::BitPlanes;

std::vector<float> random_row(int64_t n, uint64_t seed, float range = 3.0f) {
  std::vector<float> x(static_cast<size_t>(n));
  uint64_t state = seed * 2654435761u + 1;
  for (auto& v : x) {
    state = state * 6364136223846793005ull + 1442695040888963407ull;
    v = range * (float(int64_t(state >> 40) % 20001 - 10000) / 10000.0f);
  }
  return x;
}

TEST(BitPlanes, RoundTripIsTheRowsGridAndTheMsbPlaneItsBucketsMiddle) {
  for (int64_t hd : {16, 20, 24, 64, 128})  // 20: not whole words of 8 values
    for (int32_t msb = 1; msb <= 8; ++msb)
      for (int32_t lsb = msb == 1 ? 1 : 0; lsb <= 8; ++lsb) {  // 2 bits at least
        const BitPlanes p{msb, lsb};
        const auto x = random_row(hd, uint64_t(hd * 100 + msb * 10 + lsb));
        std::vector<uint8_t> record(size_t(kernels::bit_plane_row_bytes(hd, p)));
        ASSERT_EQ(int64_t(record.size()), 4 + (hd * msb + 7) / 8 + (hd * lsb + 7) / 8);
        cpu::bit_plane_encode(x.data(), hd, p, record.data());
        const int32_t qmax = (1 << (p.bits() - 1)) - 1;
        float amax = 0;
        for (float v : x) amax = std::max(amax, std::fabs(v));
        const float scale = amax / float(qmax);
        std::vector<float> full(static_cast<size_t>(hd)), coarse(static_cast<size_t>(hd));
        cpu::bit_plane_decode(record.data(), hd, p, true, full.data());
        cpu::bit_plane_decode(record.data(), hd, p, false, coarse.data());
        for (int64_t i = 0; i < hd; ++i) {
          // Both planes: exactly the grid point round(x / scale) * scale.
          const float q = float(std::clamp(int32_t(std::lrint(x[size_t(i)] / scale)), -qmax, qmax));
          EXPECT_NEAR(full[size_t(i)], q * scale, 1e-6f * amax) << hd << " " << msb << "+" << lsb << " i=" << i;
          EXPECT_LE(std::fabs(full[size_t(i)] - x[size_t(i)]), 0.5f * scale * 1.0001f);
          // The MSB plane alone: within half an MSB bucket of the grid point.
          EXPECT_LE(std::fabs(coarse[size_t(i)] - q * scale), 0.5f * float((1 << lsb) - 1) * scale * 1.0001f + 1e-6f);
          // The scalar reader (the device kernels' code) agrees with the decoder.
          EXPECT_EQ(kernels::bit_plane_value(record.data(), hd, p, i, true), full[size_t(i)]);
          EXPECT_EQ(kernels::bit_plane_value(record.data(), hd, p, i, false), coarse[size_t(i)]);
        }
        if (lsb == 0) {
          EXPECT_EQ(full, coarse);  // nothing to refetch
        }
      }
}

TEST(BitPlanes, TheLargestMagnitudeIsExactAndAZeroRowStaysZero) {
  const int64_t hd = 16;
  const BitPlanes p{6, 4};
  std::vector<float> x(hd, 0.25f);
  x[3] = -2.0f;  // the largest magnitude: the grid's end, exactly
  std::vector<uint8_t> record(size_t(kernels::bit_plane_row_bytes(hd, p)));
  cpu::bit_plane_encode(x.data(), hd, p, record.data());
  std::vector<float> out(hd);
  cpu::bit_plane_decode(record.data(), hd, p, true, out.data());
  EXPECT_EQ(out[3], -2.0f);
  const std::vector<float> zeros(hd, 0.0f);
  cpu::bit_plane_encode(zeros.data(), hd, p, record.data());
  cpu::bit_plane_decode(record.data(), hd, p, false, out.data());
  EXPECT_EQ(out, zeros);
}

// Attention over bit-plane pages is attention over their decoded rows, for
// either set of planes: the kernels widen each row as they read it.
TEST(BitPlanes, KernelsReadBitPlanePagesAsTheirDecodedRows) {
  const int64_t hd = 16, n = 45;
  const BitPlanes p{6, 4};
  const int64_t rb = kernels::bit_plane_row_bytes(hd, p);
  std::vector<uint8_t> k(size_t(n * rb)), v(size_t(n * rb));
  for (int64_t t = 0; t < n; ++t) {
    cpu::bit_plane_encode(random_row(hd, uint64_t(t)).data(), hd, p, &k[size_t(t * rb)]);
    cpu::bit_plane_encode(random_row(hd, uint64_t(1000 + t)).data(), hd, p, &v[size_t(t * rb)]);
  }
  const auto q = random_row(3 * hd, 77, 1.0f);  // three query rows
  for (bool lsb : {false, true}) {
    std::vector<float> kf(size_t(n * hd)), vf(size_t(n * hd));
    for (int64_t t = 0; t < n; ++t) {
      cpu::bit_plane_decode(&k[size_t(t * rb)], hd, p, lsb, &kf[size_t(t * hd)]);
      cpu::bit_plane_decode(&v[size_t(t * rb)], hd, p, lsb, &vf[size_t(t * hd)]);
    }
    // Two pages of each, split at key 20.
    const cpu::KvPageRef planes[2] = {{k.data(), v.data(), 20, kernels::DType::F32, p, lsb},
                                      {&k[size_t(20 * rb)], &v[size_t(20 * rb)], int32_t(n - 20), kernels::DType::F32,
                                       p, lsb}};
    const cpu::KvPageRef floats[2] = {{kf.data(), vf.data(), 20}, {&kf[size_t(20 * hd)], &vf[size_t(20 * hd)], int32_t(n - 20)}};
    const int32_t visible[3] = {30, 44, 45};
    std::vector<float> want(size_t(3 * hd)), got(size_t(3 * hd));
    const cpu::QueryTile want_tile{q.data(), 3, 1, hd, hd, visible, want.data(), hd, hd};
    const cpu::QueryTile got_tile{q.data(), 3, 1, hd, hd, visible, got.data(), hd, hd};
    cpu::attention_tiled(want_tile, floats, 2, hd, 0.25f);
    cpu::attention_tiled(got_tile, planes, 2, hd, 0.25f);
    EXPECT_EQ(got, want) << "lsb " << lsb;
    std::vector<float> mass_want(n, 0.0f), mass_got(n, 0.0f);
    cpu::attention_paged(q.data(), 3, hd, floats, 2, visible, hd, 0.25f, want.data(), hd, mass_want.data());
    cpu::attention_paged(q.data(), 3, hd, planes, 2, visible, hd, 0.25f, got.data(), hd, mass_got.data());
    EXPECT_EQ(got, want);
    EXPECT_EQ(mass_got, mass_want);
  }
}

// A method that only quantizes its KV pages, and keeps each layer's key mass
// of the latest call (with one query head per kv head, a decode step's mass of
// a head is its row's probabilities).
class QuantMethod final : public Method {
 public:
  QuantMethod(int32_t msb, int32_t lsb, double threshold) : quant_{msb, lsb, threshold} {}
  KvQuantization kv_quantization() const override { return quant_; }
  void on_attention(const StepInfo&, const KvView&, const AttentionStats& stats) override {
    if (stats.layer == 0) layer0_[stats.kv_head].assign(stats.key_mass.begin(), stats.key_mass.end());
  }
  float layer0_max(int32_t head) const { return *std::max_element(layer0_.at(head).begin(), layer0_.at(head).end()); }
  const std::vector<float>& layer0(int32_t head) const { return layer0_.at(head); }

 private:
  KvQuantization quant_;
  std::map<int32_t, std::vector<float>> layer0_;
};

std::shared_ptr<Model> mha_model() {
  static std::shared_ptr<Model> model;
  if (!model) {
    SyntheticModelSpec spec;
    spec.name = "bit-planes-mha";
    spec.n_heads = 4;
    spec.n_kv_heads = 4;
    spec.seed = 11;
    model = test::load_synthetic(spec);
  }
  return model;
}

TEST(BitPlanes, AMethodsSequencesLiveInAPoolOfItsPlanes) {
  auto model = test::gqa_test_model("bit-planes", 5);
  auto engine = Engine::create(model, EngineOptions{.page_size = 4});
  ASSERT_TRUE(engine.ok());
  Engine& e = **engine;
  const int64_t hd = model->config().head_dim;
  auto dense_seq = e.new_sequence();
  QuantMethod method(6, 4, 0.05);
  ASSERT_TRUE(e.set_method(&method, kHookAttentionFeedback).ok());
  auto seq = e.new_sequence();
  EXPECT_EQ(seq->pool().format(), KvPageFormat::BitPlanes);
  EXPECT_EQ(seq->pool().page_bytes(), 2 * 4 * (4 + hd * 6 / 8 + hd * 4 / 8));  // 24 bytes a row at head_dim 16, f32: 64
  const auto prompt = test::random_tokens(model->config().n_vocab, 37, 3);
  ASSERT_TRUE(e.forward(*seq, prompt, int64_t(prompt.size()), nullptr).ok());
  EXPECT_EQ(e.pool().bytes_in_use(), seq->pages_held() * e.pool().page_bytes());
  // A sequence of the dense pool is refused, naming both formats.
  auto refused = e.forward(*dense_seq, prompt, int64_t(prompt.size()), nullptr);
  ASSERT_FALSE(refused.ok());
  EXPECT_NE(refused.message().find("f32"), std::string::npos) << refused.message();
  EXPECT_NE(refused.message().find("bit planes 6+4"), std::string::npos) << refused.message();
  // Dense again: the default pool.
  ASSERT_TRUE(e.set_method(nullptr, 0).ok());
  EXPECT_EQ(e.new_sequence()->pool().format(), KvPageFormat::F32);
  EXPECT_TRUE(e.forward(*dense_seq, prompt, int64_t(prompt.size()), nullptr).ok());
}

// A saved dense prefill can start a quantizing method: clone into a host pool
// of another format converts each row (and back, at full precision).
TEST(BitPlanes, CloneIntoABitPlanePoolQuantizesEachRow) {
  const KvCacheShape shape{2, 2, 16, 4};
  auto dense = std::make_shared<KvPagePool>(shape);
  auto planes = std::make_shared<KvPagePool>(shape, 256, make_host_bit_plane_storage(BitPlanes{6, 4}));
  KvSequence seq(dense);
  for (int32_t l = 0; l < 2; ++l)
    for (int32_t g = 0; g < 2; ++g)
      for (int32_t i = 0; i < 11; ++i)
        seq.append(l, g, random_row(16, uint64_t(l * 100 + g * 20 + i)).data(),
                   random_row(16, uint64_t(5000 + l * 100 + g * 20 + i)).data(), 3 * i);
  seq.set_n_past(33);
  const auto quantized = seq.clone(planes);
  const auto back = quantized->clone(dense);
  // Planes of other widths but the same row size (3+5 and 4+4 bits) are converted, not copied.
  auto other = std::make_shared<KvPagePool>(shape, 256, make_host_bit_plane_storage(BitPlanes{4, 4}));
  auto wider = std::make_shared<KvPagePool>(shape, 256, make_host_bit_plane_storage(BitPlanes{3, 5}));
  ASSERT_EQ(other->page_bytes(), wider->page_bytes());
  const auto as_4_4 = seq.clone(other);
  const auto as_3_5 = as_4_4->clone(wider);
  std::vector<uint8_t> rec35(size_t(kernels::bit_plane_row_bytes(16, BitPlanes{3, 5})));
  std::vector<float> row44(16);
  cpu::bit_plane_decode(as_4_4->k_bytes(1, 1, 5), 16, BitPlanes{4, 4}, true, row44.data());
  cpu::bit_plane_encode(row44.data(), 16, BitPlanes{3, 5}, rec35.data());
  EXPECT_EQ(std::memcmp(rec35.data(), as_3_5->k_bytes(1, 1, 5), rec35.size()), 0);
  EXPECT_EQ(quantized->n_past(), 33);
  EXPECT_EQ(quantized->pages_held(), seq.pages_held());
  std::vector<uint8_t> record(size_t(kernels::bit_plane_row_bytes(16, BitPlanes{6, 4})));
  std::vector<float> want(16);
  for (int32_t l = 0; l < 2; ++l)
    for (int32_t g = 0; g < 2; ++g) {
      EXPECT_EQ(quantized->table(l, g).positions, seq.table(l, g).positions);
      for (int32_t i = 0; i < 11; ++i) {
        cpu::bit_plane_encode(seq.k_row(l, g, i), 16, BitPlanes{6, 4}, record.data());
        EXPECT_EQ(std::memcmp(record.data(), quantized->k_bytes(l, g, i), record.size()), 0);
        cpu::bit_plane_decode(record.data(), 16, BitPlanes{6, 4}, true, want.data());
        EXPECT_EQ(std::vector<float>(back->k_row(l, g, i), back->k_row(l, g, i) + 16), want);
      }
    }
}

TEST(BitPlanes, BadWidthsAndThresholdsAreRefused) {
  auto model = test::gqa_test_model("bit-planes", 5);
  auto engine = Engine::create(model, EngineOptions{.page_size = 4});
  ASSERT_TRUE(engine.ok());
  for (auto [msb, lsb, threshold, words] :
       {std::tuple{9, 4, 0.05, "9 MSB + 4 LSB"}, {6, 9, 0.05, "6 MSB + 9 LSB"}, {6, -1, 0.05, "6 MSB + -1 LSB"},
        {1, 0, 0.05, "1 MSB + 0 LSB"}, {6, 4, 1.5, "requant_threshold 1.5"}}) {
    QuantMethod method(msb, lsb, threshold);
    auto s = (*engine)->set_method(&method, 0, nullptr, "spatten");
    ASSERT_FALSE(s.ok());
    EXPECT_NE(s.message().find(words), std::string::npos) << s.message();
    EXPECT_NE(s.message().find("spatten"), std::string::npos) << s.message();
  }
}

// Layer 0's attention in a decode step depends on the tokens alone (its
// queries and cache come from the embeddings), so its refetch decisions can
// be predicted from an MSB-only run: a row refetches exactly when its largest
// probability is below the threshold, and a row that does not is unchanged.
TEST(BitPlanes, ARowRefetchesExactlyWhenItsLargestProbabilityIsBelowTheThreshold) {
  auto model = mha_model();
  const int32_t heads = model->config().n_heads;
  auto engine = Engine::create(model, EngineOptions{.page_size = 4});
  ASSERT_TRUE(engine.ok());
  Engine& e = **engine;
  const auto prompt = test::random_tokens(model->config().n_vocab, 50, 9);
  const int32_t next = prompt[7];
  auto decode_once = [&](QuantMethod& method) {
    EXPECT_TRUE(e.set_method(&method, kHookAttentionFeedback).ok());
    auto seq = e.new_sequence();
    EXPECT_TRUE(e.forward(*seq, prompt, int64_t(prompt.size()), nullptr).ok());
    e.reset_counters();
    EXPECT_TRUE(e.forward(*seq, std::vector<int32_t>{next}, 1, nullptr).ok());
    EngineCounters counted = e.counters();
    (void)e.set_method(nullptr, 0);
    return counted;
  };
  QuantMethod msb_only(6, 4, 0.0);  // never refetches
  const EngineCounters none = decode_once(msb_only);
  ASSERT_EQ(none.requant_rows.size(), size_t(model->config().n_layers));
  EXPECT_EQ(none.requant_rows[0], heads);
  EXPECT_EQ(none.requant_refetched[0], 0);
  std::vector<float> largest(static_cast<size_t>(heads));
  for (int32_t h = 0; h < heads; ++h) largest[size_t(h)] = msb_only.layer0_max(h);
  std::vector<float> sorted = largest;
  std::sort(sorted.begin(), sorted.end());
  int32_t thresholds = 0;
  for (int32_t below = 1; below < heads; ++below) {
    if (sorted[size_t(below)] - sorted[size_t(below - 1)] < 1e-4f) continue;  // no threshold between them
    ++thresholds;
    const double threshold = 0.5 * (double(sorted[size_t(below - 1)]) + double(sorted[size_t(below)]));
    QuantMethod method(6, 4, threshold);
    const EngineCounters counted = decode_once(method);
    EXPECT_EQ(counted.requant_refetched[0], below) << "threshold " << threshold;
    for (int32_t h = 0; h < heads; ++h) {
      if (largest[size_t(h)] < threshold)  // recomputed from both planes: other probabilities
        EXPECT_NE(method.layer0(h), msb_only.layer0(h)) << "head " << h;
      else
        EXPECT_EQ(method.layer0(h), msb_only.layer0(h)) << "head " << h;
    }
  }
  EXPECT_GE(thresholds, 2) << "the heads' largest probabilities are too close to put thresholds between them";
}

TEST(BitPlanes, RefetchingEveryRowIsCloserToDenseAndCountsTheLsbBytes) {
  auto model = test::gqa_test_model("bit-planes", 5);
  const auto& c = model->config();
  auto engine = Engine::create(model, EngineOptions{.page_size = 4});
  ASSERT_TRUE(engine.ok());
  Engine& e = **engine;
  const auto prompt = test::random_tokens(c.n_vocab, 60, 4);
  const test::ForwardTrace dense = test::run_trace(e, nullptr, prompt, 8);
  e.reset_counters();
  (void)test::run_trace(e, nullptr, prompt, 8, dense.tokens);
  const EngineCounters dense_counted = e.counters();
  const int64_t hd = c.head_dim;
  const BitPlanes p{4, 4};
  double error[2] = {};
  for (int all = 0; all < 2; ++all) {
    QuantMethod method(p.msb, p.lsb, all ? 1.0 : 0.0);
    ASSERT_TRUE(e.set_method(&method, 0).ok());
    e.reset_counters();
    const test::ForwardTrace got = test::run_trace(e, &method, prompt, 8, dense.tokens);
    const EngineCounters counted = e.counters();
    (void)e.set_method(nullptr, 0);
    error[all] = test::normalized_max_error(got.logits, dense.logits);
    int64_t rows = 0, refetched = 0;
    for (size_t l = 0; l < counted.requant_rows.size(); ++l) {
      rows += counted.requant_rows[l];
      refetched += counted.requant_refetched[l];
    }
    EXPECT_EQ(rows, int64_t(prompt.size() + 8) * c.n_heads * c.n_layers);
    // Every row but the first (one key: its probability is 1, never below the threshold).
    EXPECT_EQ(refetched, all ? rows - c.n_heads * c.n_layers : 0);
    EXPECT_EQ(counted.decode_keys_read, dense_counted.decode_keys_read);
    // Every key's scale and MSB planes; with refetches, every cached key's LSB planes too.
    const int64_t msb_bytes = 2 * kernels::bit_plane_msb_read_bytes(hd, p);
    EXPECT_EQ(counted.decode_lsb_keys_read, all ? counted.decode_keys_read : 0);
    EXPECT_EQ(counted.decode_kv_bytes_read,
              counted.decode_keys_read * msb_bytes + counted.decode_lsb_keys_read * 2 * kernels::bit_plane_bytes(hd, p.lsb));
    const auto map = counted.as_map();
    EXPECT_DOUBLE_EQ(map.at("requant_refetch_rate"), double(refetched) / double(rows));
    EXPECT_EQ(map.count("requant_refetch_rate.layer01"), 1u);
  }
  std::printf("normalized max logit error vs dense: MSB planes %.4g, both planes %.4g\n", error[0], error[1]);
  EXPECT_LT(error[1], 0.05) << "8-bit rows far from dense";
  EXPECT_LT(error[1], 0.5 * error[0]) << "the LSB planes did not bring the rows closer to dense";
}

}  // namespace test_bit_planes
}  // namespace inferlab
