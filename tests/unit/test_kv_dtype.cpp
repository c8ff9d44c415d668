// The CPU backend's KV pages in f16 or bf16 (EngineOptions::kv_dtype): rows
// are rounded to nearest even as they are appended, attention widens them as
// it reads them, the traffic counters count half the bytes, and every method
// mechanism (eviction with re-rotation from saved originals, retention, page
// selection by key bound, sparse prefill) runs on them. Float32 pages stay the
// reference the others are measured against.
#include <gtest/gtest.h>

#include <cmath>
#include <string>
#include <vector>

#include "cpu/cpu_twins.h"
#include "engine/engine.h"
#include "inferlab/testing.h"

namespace inferlab {
namespace test_kv_dtype {

namespace cpu = kernels::cpu;
using kernels::DType;

struct Half {
  KvDType option;
  DType dtype;
  double unit_roundoff;  // of one rounding to the type
};
const Half kHalves[] = {{KvDType::F16, DType::F16, std::ldexp(1.0, -11)},
                        {KvDType::BF16, DType::BF16, std::ldexp(1.0, -8)}};

std::shared_ptr<Model> model() { return test::gqa_test_model("kv-dtype", 21); }

std::unique_ptr<Engine> engine_with(KvDType kv) {
  auto engine = Engine::create(model(), EngineOptions{.page_size = 4, .kv_dtype = kv});
  EXPECT_TRUE(engine.ok()) << (engine.ok() ? "" : engine.message());
  return engine.ok() ? std::move(*engine) : nullptr;
}

// Stored token i's K (value = false) or V row of (layer, kv head), as float.
std::vector<float> stored_row(const KvSequence& seq, int32_t l, int32_t g, int32_t i, bool value) {
  const int32_t hd = seq.pool().shape().head_dim;
  std::vector<float> row(static_cast<size_t>(hd));
  cpu::convert_to_float(value ? seq.v_bytes(l, g, i) : seq.k_bytes(l, g, i), seq.pool().dtype(), hd, row.data());
  return row;
}

std::vector<float> rounded(const std::vector<float>& x, DType dtype) {
  std::vector<uint16_t> bits(x.size());
  std::vector<float> out(x.size());
  cpu::convert_from_float(x.data(), int64_t(x.size()), bits.data(), dtype);
  cpu::convert_to_float(bits.data(), dtype, int64_t(x.size()), out.data());
  return out;
}

double relative_error(const std::vector<float>& a, const std::vector<float>& b) {
  double diff = 0, ref = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    diff += double(a[i] - b[i]) * double(a[i] - b[i]);
    ref += double(b[i]) * double(b[i]);
  }
  return std::sqrt(diff / std::max(ref, 1e-30));
}

TEST(KvDType, HalfPagesHoldTheRoundedRowsAndHalveTheBytesRead) {
  const auto tokens = test::random_tokens(model()->config().n_vocab, 30, 3);
  auto reference = engine_with(KvDType::F32);
  ASSERT_TRUE(reference);
  auto ref_seq = reference->new_sequence();
  ASSERT_TRUE(reference->forward(*ref_seq, std::span(tokens.data(), 22), 22, nullptr).ok());
  for (size_t t = 22; t < tokens.size(); ++t)
    ASSERT_TRUE(reference->forward(*ref_seq, std::span(&tokens[t], 1), 0, nullptr).ok());
  EXPECT_EQ(reference->pool().format(), KvPageFormat::F32);
  for (const Half& half : kHalves) {
    auto engine = engine_with(half.option);
    ASSERT_TRUE(engine);
    EXPECT_EQ(engine->pool().dtype(), half.dtype);
    EXPECT_EQ(engine->pool().token_bytes() * 2, reference->pool().token_bytes());
    auto seq = engine->new_sequence();
    ASSERT_TRUE(engine->forward(*seq, std::span(tokens.data(), 22), 22, nullptr).ok());
    for (size_t t = 22; t < tokens.size(); ++t)
      ASSERT_TRUE(engine->forward(*seq, std::span(&tokens[t], 1), 0, nullptr).ok());
    // Layer 0's K/V come from the embeddings alone: the stored rows are the float rows rounded once.
    const ModelConfig& c = model()->config();
    for (int32_t g = 0; g < c.n_kv_heads; ++g)
      for (int32_t i = 0; i < int32_t(tokens.size()); ++i)
        for (bool value : {false, true})
          ASSERT_EQ(stored_row(*seq, 0, g, i, value), rounded(stored_row(*ref_seq, 0, g, i, value), half.dtype))
              << dtype_name(half.dtype) << " kv head " << g << " token " << i << (value ? " V" : " K");
    // The same keys read per step, at half the bytes.
    EXPECT_EQ(engine->counters().decode_keys_read, reference->counters().decode_keys_read);
    EXPECT_GT(engine->counters().decode_kv_bytes_read, 0);
    EXPECT_EQ(engine->counters().decode_kv_bytes_read * 2, reference->counters().decode_kv_bytes_read);
  }
}

TEST(KvDType, LogitsStayWithinTheRoundingOfTheKvRows) {
  for (const Half& half : kHalves) {
    double worst = 0, agree = 0, positions = 0;
    for (uint64_t seed : {1u, 2u, 3u}) {
      const auto prompt = test::random_tokens(model()->config().n_vocab, 40, seed);
      auto reference = engine_with(KvDType::F32);
      auto engine = engine_with(half.option);
      ASSERT_TRUE(reference && engine);
      const test::ForwardTrace want = test::run_trace(*reference, nullptr, prompt, 16);
      const test::ForwardTrace got = test::run_trace(*engine, nullptr, prompt, 16, want.tokens);
      ASSERT_EQ(got.logits.size(), want.logits.size());
      worst = std::max(worst, test::normalized_max_error(got.logits, want.logits));
      const size_t v = size_t(model()->config().n_vocab);
      for (size_t r = 0; r * v < want.logits.size(); ++r) {
        const float* a = want.logits.data() + r * v;
        const float* b = got.logits.data() + r * v;
        agree += (std::max_element(a, a + v) - a) == (std::max_element(b, b + v) - b);
        ++positions;
      }
    }
    // Two layers of attention over rows each off by at most one rounding.
    EXPECT_GT(worst, 0.0) << dtype_name(half.dtype) << ": nothing was rounded";
    EXPECT_LT(worst, 16 * half.unit_roundoff) << dtype_name(half.dtype);
    EXPECT_GE(agree / positions, 0.95) << dtype_name(half.dtype);
  }
}

// A method on half pages against the same method on float32 pages.
struct MethodRun {
  std::vector<float> logits;
  std::vector<std::vector<int32_t>> positions;  // per (layer, kv head) at the end
  EngineCounters counters;
};

MethodRun run_method(KvDType kv, const std::string& plugin, const ParamValues& params, int prompt_tokens,
                     int decode_steps, const std::vector<int32_t>& forced) {
  MethodRun out;
  auto engine = engine_with(kv);
  if (!engine) return out;
  test::ActiveMethod active = test::activate_method(*engine, plugin, params);
  if (active.handle.get() == nullptr) return out;
  const auto prompt = test::random_tokens(model()->config().n_vocab, prompt_tokens, 9);
  auto seq = engine->new_sequence();
  active.handle->begin_sequence(engine->shape());
  auto sink = [&](int64_t, std::span<const float> l) { out.logits.insert(out.logits.end(), l.begin(), l.end()); };
  EXPECT_TRUE(engine->forward(*seq, prompt, int64_t(prompt.size()) - 1, sink).ok());
  for (int step = 0; step < decode_steps; ++step)
    EXPECT_TRUE(engine->forward(*seq, std::vector<int32_t>{forced[size_t(step)]}, 0, sink).ok());
  const ModelConfig& c = model()->config();
  for (int32_t l = 0; l < c.n_layers; ++l)
    for (int32_t g = 0; g < c.n_kv_heads; ++g) out.positions.push_back(seq->table(l, g).positions);
  out.counters = engine->counters();
  return out;
}

struct MethodCase {
  std::string plugin;
  std::vector<std::pair<std::string, ParamValue>> params;
  int prompt_tokens;
  bool same_positions;  // the method keeps tokens by position alone
};

TEST(KvDType, EveryMethodMechanismRunsOnHalfPages) {
  const std::vector<MethodCase> cases = {
      {"streamingllm", {{"sink_tokens", int64_t(2)}, {"window", int64_t(8)}}, 24, true},
      {"streamingllm", {{"sink_tokens", int64_t(2)}, {"window", int64_t(8)}, {"positions", std::string("original")}},
       24, true},
      {"h2o", {{"heavy", int64_t(6)}, {"recent", int64_t(4)}}, 24, false},
      {"quest", {{"token_budget", int64_t(8)}, {"page_size", int64_t(4)}, {"dense_layers", int64_t(0)}}, 40, true},
      {"minference",
       {{"default_pattern", std::string("vertical_and_slash")}, {"vertical", int64_t(4)}, {"slash", int64_t(4)},
        {"kernel_block", int64_t(8)}, {"last_q", int64_t(8)}, {"search", std::string("off")}},
       48, true},
  };
  const auto forced = test::random_tokens(model()->config().n_vocab, 12, 4);
  for (const MethodCase& mc : cases) {
    ParamValues params;
    for (const auto& [name, value] : mc.params) params.set(name, value);
    const MethodRun want = run_method(KvDType::F32, mc.plugin, params, mc.prompt_tokens, 12, forced);
    ASSERT_FALSE(want.logits.empty()) << mc.plugin;
    for (const Half& half : kHalves) {
      const MethodRun got = run_method(half.option, mc.plugin, params, mc.prompt_tokens, 12, forced);
      const std::string what = mc.plugin + " on " + dtype_name(half.dtype);
      ASSERT_EQ(got.logits.size(), want.logits.size()) << what;
      EXPECT_LT(test::normalized_max_error(got.logits, want.logits), 16 * half.unit_roundoff) << what;
      if (mc.same_positions) {
        EXPECT_EQ(got.positions, want.positions) << what;
      }
      EXPECT_EQ(got.counters.tokens_evicted, want.counters.tokens_evicted) << what;
      EXPECT_EQ(got.counters.sparse_prefill_keys_read, want.counters.sparse_prefill_keys_read) << what;
      EXPECT_EQ(got.counters.decode_kv_bytes_read * 2, want.counters.decode_kv_bytes_read) << what;
    }
    if (mc.plugin == "streamingllm" || mc.plugin == "h2o") {
      EXPECT_GT(want.counters.tokens_evicted, 0) << mc.plugin;
    } else if (mc.plugin == "quest") {
      EXPECT_LT(want.counters.decode_keys_read, want.counters.decode_keys_cached);
    } else {
      EXPECT_GT(want.counters.sparse_prefill_heads, 0) << mc.plugin;
    }
  }
}

// StreamingLLM with cache positions moves every key one index down per step:
// on half pages a moved key is its original turned once (one more rounding),
// never the stored key turned again (which drifts by a rounding per move).
TEST(KvDType, MovedKeysAreTurnedFromTheirOriginals) {
  ParamValues params;
  params.set("sink_tokens", int64_t(2));
  params.set("window", int64_t(8));
  const auto forced = test::random_tokens(model()->config().n_vocab, 300, 5);
  for (const Half& half : kHalves) {
    auto reference = engine_with(KvDType::F32), engine = engine_with(half.option);
    ASSERT_TRUE(reference && engine);
    test::ActiveMethod ref_method = test::activate_method(*reference, "streamingllm", params);
    test::ActiveMethod method = test::activate_method(*engine, "streamingllm", params);
    ASSERT_TRUE(ref_method.handle.get() && method.handle.get());
    auto ref_seq = reference->new_sequence(), seq = engine->new_sequence();
    ref_method.handle->begin_sequence(reference->shape());
    method.handle->begin_sequence(engine->shape());
    for (int32_t t : forced) {
      ASSERT_TRUE(reference->forward(*ref_seq, std::vector<int32_t>{t}, 1, nullptr).ok());
      ASSERT_TRUE(engine->forward(*seq, std::vector<int32_t>{t}, 1, nullptr).ok());
    }
    EXPECT_GT(engine->counters().tokens_evicted, 500);
    // Layer 0's keys are the float engine's keys up to two roundings (first write, the turn).
    const ModelConfig& c = model()->config();
    for (int32_t g = 0; g < c.n_kv_heads; ++g) {
      ASSERT_EQ(seq->table(0, g).positions, ref_seq->table(0, g).positions);
      for (int32_t i = 0; i < seq->table(0, g).n_tokens(); ++i)
        EXPECT_LT(relative_error(stored_row(*seq, 0, g, i, false), stored_row(*ref_seq, 0, g, i, false)),
                  2.5 * half.unit_roundoff)
            << dtype_name(half.dtype) << " kv head " << g << " token " << i;
    }
  }
}

TEST(KvDType, TheCudaBackendKeepsItsComputeType) {
  auto engine = Engine::create(model(), EngineOptions{.backend = BackendKind::Cuda, .kv_dtype = KvDType::F32});
  ASSERT_FALSE(engine.ok());
  EXPECT_NE(engine.message().find("the CUDA backend stores the KV cache in its compute type (f16), not f32"),
            std::string::npos)
      << engine.message();
  EXPECT_EQ(parse_kv_dtype("f8").message(), "KV dtype \"f8\" is not one of auto, f32, f16, bf16");
}

}  // namespace test_kv_dtype
}  // namespace inferlab
