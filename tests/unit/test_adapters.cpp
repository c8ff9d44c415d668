// Per-run low-rank adapters (WeightEditor::add_adapter): unmerged adapters give
// the logits of the merged weight; several on one projection add up; a zero
// adapter changes nothing; the next run without them is dense again, exactly;
// bad adapters are refused at load naming the tensor.
#include <gtest/gtest.h>

#include "adapter_method.h"
#include "plugin_test_support.h"

namespace inferlab {
namespace test_adapters {

using test::AdapterMethod;
using test::AdapterSpec;
using test::random_adapter;

std::shared_ptr<Model> model() {
  static std::shared_ptr<Model> m = [] {
    SyntheticModelSpec spec;
    spec.name = "adapters";
    spec.n_layers = 2;
    spec.n_heads = 4;
    spec.n_kv_heads = 2;
    spec.tied_embeddings = true;  // an adapter on the output then needs a copy of its own
    spec.seed = 9;
    return test::load_synthetic(spec);
  }();
  return m;
}

std::unique_ptr<Engine> cpu_engine() {
  auto engine = Engine::create(model(), EngineOptions{8, 0, 0});
  EXPECT_TRUE(engine.ok());
  return engine.ok() ? std::move(*engine) : nullptr;
}

Result<std::vector<float>> run(Engine& engine, AdapterMethod* method, const std::vector<int32_t>& tokens) {
  return test::run_with_adapters(engine, method, tokens, 6);
}

std::vector<AdapterSpec> spread(const ModelConfig& c, bool zero_b = false) {
  return test::adapters_on_every_projection(c, zero_b);
}

TEST(Adapters, UnmergedGiveTheMergedWeightsLogitsAndLeaveTheNextRunDense) {
  auto engine = cpu_engine();
  ASSERT_NE(engine, nullptr);
  const ModelConfig& c = engine->config();
  const auto tokens = test::random_tokens(c.n_vocab, 30, 5);
  auto dense = run(*engine, nullptr, tokens);
  ASSERT_TRUE(dense.ok()) << dense.message();

  AdapterMethod unmerged(spread(c), false), merged(spread(c), true);
  auto u = run(*engine, &unmerged, tokens), m = run(*engine, &merged, tokens);
  ASSERT_TRUE(u.ok()) << u.message();
  ASSERT_TRUE(m.ok()) << m.message();
  EXPECT_GT(test::normalized_max_error(*u, *dense), 1e-3) << "the adapters change nothing";
  EXPECT_LT(test::normalized_max_error(*u, *m), 1e-5);

  // The shared model is untouched: the next run is dense again, bitwise.
  auto after = run(*engine, nullptr, tokens);
  ASSERT_TRUE(after.ok());
  EXPECT_EQ(*after, *dense);

  // A zero adapter (B = 0, as LoRA initializes it) is dense, merged or not.
  AdapterMethod zero(spread(c, true), false), zero_merged(spread(c, true), true);
  EXPECT_EQ(*run(*engine, &zero, tokens), *dense);
  EXPECT_EQ(*run(*engine, &zero_merged, tokens), *dense);
}

TEST(Adapters, SeveralOnOneProjectionAddUp) {
  auto engine = cpu_engine();
  ASSERT_NE(engine, nullptr);
  const ModelConfig& c = engine->config();
  const auto tokens = test::random_tokens(c.n_vocab, 24, 6);
  // Two rank-2 adapters on W_q equal one rank-4 adapter made of both.
  const auto first = random_adapter(c.q_dim(), c.n_embd, 2, 1, 0.5f), second = random_adapter(c.q_dim(), c.n_embd, 2, 2, 0.5f);
  LowRankAdapter both;
  both.rank = 4;
  both.scale = 0.5f;
  both.a = first.a;
  both.a.insert(both.a.end(), second.a.begin(), second.a.end());
  for (int64_t o = 0; o < c.q_dim(); ++o) {
    both.b.insert(both.b.end(), first.b.begin() + o * 2, first.b.begin() + o * 2 + 2);
    both.b.insert(both.b.end(), second.b.begin() + o * 2, second.b.begin() + o * 2 + 2);
  }
  AdapterMethod two({{"attn_q", 1, first}, {"attn_q", 1, second}}), one({{"attn_q", 1, both}});
  auto a = run(*engine, &two, tokens), b = run(*engine, &one, tokens);
  ASSERT_TRUE(a.ok() && b.ok());
  EXPECT_EQ(*a, *b);
  // Merged adapters stack on a replaced weight too: both merged equal both unmerged.
  AdapterMethod two_merged({{"attn_q", 1, first}, {"attn_q", 1, second}}, true);
  EXPECT_LT(test::normalized_max_error(*run(*engine, &two_merged, tokens), *a), 1e-5);
}

TEST(Adapters, OnTheTiedOutputHeadTheyAreMergedIntoACopyOfItsOwn) {
  auto engine = cpu_engine();
  ASSERT_NE(engine, nullptr);
  const ModelConfig& c = engine->config();
  const auto tokens = test::random_tokens(c.n_vocab, 20, 7);
  auto dense = run(*engine, nullptr, tokens);
  ASSERT_TRUE(dense.ok());
  const auto head = random_adapter(c.n_vocab, c.n_embd, 2, 3, 20.0f);
  AdapterMethod merged({{"output", -1, head}}, true);
  auto m = run(*engine, &merged, tokens);
  ASSERT_TRUE(m.ok()) << m.message();
  EXPECT_GT(test::normalized_max_error(*m, *dense), 1e-3);
  // The shared embedding the head is tied to is untouched: a dense run after is dense.
  EXPECT_EQ(*run(*engine, nullptr, tokens), *dense);
  AdapterMethod unmerged({{"output", -1, head}}, false);
  auto refused = run(*engine, &unmerged, tokens);
  ASSERT_FALSE(refused.ok());
  EXPECT_NE(refused.message().find("the output projection takes merged adapters only"), std::string::npos)
      << refused.message();
}

TEST(Adapters, BadAdaptersAreRefusedAtLoadNamingTheTensor) {
  auto engine = cpu_engine();
  ASSERT_NE(engine, nullptr);
  const ModelConfig& c = engine->config();
  const auto tokens = test::random_tokens(c.n_vocab, 12, 8);
  auto good = random_adapter(c.q_dim(), c.n_embd, 2, 4, 1.0f);
  auto short_a = good;
  short_a.a.pop_back();
  auto nan_b = good;
  nan_b.b[3] = std::nanf("");
  auto rank0 = good;
  rank0.rank = 0;
  for (const auto& [spec, expected] :
       {std::pair{AdapterSpec{"attn_q", 0, short_a}, "adapter on attn_q (layer 0): A has"},
        std::pair{AdapterSpec{"attn_q", 0, nan_b}, "adapter on attn_q (layer 0): a value is not finite"},
        std::pair{AdapterSpec{"attn_q", 0, rank0}, "adapter on attn_q (layer 0): rank 0 is not in 1.."},
        std::pair{AdapterSpec{"attn_q", 7, good}, "adapter on attn_q: layer 7 is not in 0..1"},
        std::pair{AdapterSpec{"attn_qq", 0, good}, "\"attn_qq\" is not a projection"}}) {
    AdapterMethod method({spec});
    auto r = run(*engine, &method, tokens);
    ASSERT_FALSE(r.ok()) << expected;
    EXPECT_NE(r.message().find("plugin adapters: on_load: "), std::string::npos) << r.message();
    EXPECT_NE(r.message().find(expected), std::string::npos) << r.message();
  }
  // An unmerged adapter on an FFN projection a neuron subset gathers: refused at the call, naming it.
  AdapterMethod gathered({{"ffn_up", 0, random_adapter(c.n_ff, c.n_embd, 2, 5, 1.0f)}}, false, 2);
  auto r = run(*engine, &gathered, tokens);
  ASSERT_FALSE(r.ok());
  EXPECT_NE(r.message().find("an unmerged adapter on ffn_up with a neuron subset"), std::string::npos) << r.message();
  AdapterMethod gathered_merged({{"ffn_up", 0, random_adapter(c.n_ff, c.n_embd, 2, 5, 1.0f)}}, true, 2);
  EXPECT_TRUE(run(*engine, &gathered_merged, tokens).ok());
}

}  // namespace test_adapters
}  // namespace inferlab
