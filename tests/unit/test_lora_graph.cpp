// Training through the transformer (finetune/lora_graph.h): the training
// forward gives the inference engine's logits (with and without adapters);
// the gradients of every adapter's A and B agree with central finite
// differences of the loss, on a float32 base and on a 4-bit one; layer
// checkpointing changes no bit of them, the cross-entropy's chunking only
// their rounding;
// dropout masks repeat with their seed; bad batches and adapters are refused
// with their numbers.
#include <gtest/gtest.h>

#include <cmath>
#include <random>

#include "adapter_method.h"
#include "engine/device.h"
#include "finetune/lora_graph.h"
#include "lora_graph_fixtures.h"
#include "test_support.h"

namespace inferlab {
namespace test_lora_graph {

using finetune::AdapterGrads;
using finetune::AdapterSet;
using finetune::Batch;
using finetune::GraphOptions;
using finetune::LoraGraph;

std::shared_ptr<Model> tiny_model() {
  static std::shared_ptr<Model> m = test::load_synthetic(test::lora_graph_spec("lora-graph"));
  return m;
}

AdapterSet random_adapters(const ModelConfig& c, uint64_t seed, float amplitude = 0.2f) {
  return test::random_lora_adapters(c, seed, amplitude);
}

Batch make_batch(const ModelConfig& c, int64_t len, uint64_t seed) { return test::next_token_batch(c, len, seed); }

std::vector<test::AdapterSpec> as_engine_adapters(const AdapterSet& set) {
  std::vector<test::AdapterSpec> specs;
  for (const auto& t : set.adapters) {
    LowRankAdapter a;
    a.rank = t.rank;
    a.a = t.a;
    a.b = t.b;
    a.scale = t.scale;
    specs.push_back({finetune::kSlotTensors[size_t(t.slot)], t.layer, a});
  }
  return specs;
}

std::vector<float> engine_logits(const std::vector<int32_t>& tokens, const AdapterSet* set) {
  auto engine = Engine::create(tiny_model(), EngineOptions{8, 0, 0});
  EXPECT_TRUE(engine.ok());
  std::unique_ptr<test::AdapterMethod> method;
  if (set) method = std::make_unique<test::AdapterMethod>(as_engine_adapters(*set));
  auto logits = test::run_with_adapters(**engine, method.get(), tokens, 0);
  EXPECT_TRUE(logits.ok()) << logits.message();
  return *logits;
}

std::unique_ptr<LoraGraph> graph(GraphOptions options = {}) {
  auto g = LoraGraph::create(tiny_model(), options);
  EXPECT_TRUE(g.ok()) << g.message();
  return g.ok() ? std::move(*g) : nullptr;
}

TEST(LoraGraph, TheTrainingForwardGivesTheEnginesLogits) {
  auto g = graph();
  ASSERT_NE(g, nullptr);
  const ModelConfig& c = g->config();
  const Batch b = make_batch(c, 20, 3);
  finetune::AdapterInit init;
  init.slots = {0, 3, 6};
  auto fresh = finetune::init_adapters(c, init);
  ASSERT_TRUE(fresh.ok()) << fresh.message();
  const AdapterSet adapted = random_adapters(c, 5);
  for (const AdapterSet* set : {static_cast<const AdapterSet*>(&*fresh), &adapted}) {
    auto ours = g->logits(b, *set);
    ASSERT_TRUE(ours.ok()) << ours.message();
    for (int64_t s = 0; s < b.sequences; ++s) {
      const std::vector<int32_t> tokens(b.tokens.begin() + s * b.seq_len, b.tokens.begin() + (s + 1) * b.seq_len);
      // A fresh adapter (B = 0) is the dense model; a trained one the engine with those adapters.
      const auto reference = engine_logits(tokens, set == &adapted ? set : nullptr);
      const std::vector<float> row(ours->begin() + s * b.seq_len * c.n_vocab,
                                   ours->begin() + (s + 1) * b.seq_len * c.n_vocab);
      EXPECT_LT(test::normalized_max_error(row, reference), 1e-5) << "sequence " << s;
    }
  }
  // The adapters change the logits (the comparison above is not dense twice).
  auto dense = g->logits(b, *fresh), adapted_logits = g->logits(b, adapted);
  EXPECT_GT(test::normalized_max_error(*adapted_logits, *dense), 1e-2);
}

TEST(LoraGraph, TheLossIsTheMeanNegativeLogLikelihoodOfTheLogits) {
  auto g = graph();
  ASSERT_NE(g, nullptr);
  const ModelConfig& c = g->config();
  const Batch b = make_batch(c, 16, 4);
  const AdapterSet set = random_adapters(c, 6);
  auto logits = g->logits(b, set);
  auto loss = g->loss(b, set);
  ASSERT_TRUE(logits.ok() && loss.ok());
  double sum = 0;
  int64_t count = 0;
  for (size_t i = 0; i < b.targets.size(); ++i) {
    if (b.targets[i] < 0) continue;
    const float* z = logits->data() + i * size_t(c.n_vocab);
    double mx = z[0], e = 0;
    for (int32_t j = 1; j < c.n_vocab; ++j) mx = std::max(mx, double(z[j]));
    for (int32_t j = 0; j < c.n_vocab; ++j) e += std::exp(double(z[j]) - mx);
    sum += mx + std::log(e) - z[b.targets[i]];
    ++count;
  }
  EXPECT_EQ(loss->tokens, count);
  EXPECT_EQ(count, 2 * (16 - 3));
  EXPECT_NEAR(loss->loss_sum, sum, 1e-6 * std::abs(sum));
}

// Checks every adapter tensor's gradient against central differences of the
// mean loss along random directions (and the largest entry of each on its own).
void expect_gradients_match_finite_differences(LoraGraph& g, const Batch& b, AdapterSet set, double tolerance) {
  auto base = g.loss(b, set);
  ASSERT_TRUE(base.ok()) << base.message();
  const float scale = 1.0f / float(base->tokens);
  AdapterGrads grads = AdapterGrads::like(set);
  auto r = g.forward_backward(b, set, grads, scale);
  ASSERT_TRUE(r.ok()) << r.message();
  EXPECT_NEAR(r->loss_sum, base->loss_sum, 1e-9 * std::abs(base->loss_sum));

  auto mean_loss = [&](const AdapterSet& s) { return g.loss(b, s)->loss_sum / double(base->tokens); };
  std::mt19937_64 rng(77);
  std::normal_distribution<double> normal;
  const double eps = 2e-3;
  int checked = 0;
  for (size_t i = 0; i < set.adapters.size(); ++i) {
    for (int which = 0; which < 2; ++which) {
      std::vector<float>& param = which == 0 ? set.adapters[i].a : set.adapters[i].b;
      const std::vector<float>& grad = which == 0 ? grads.a[i] : grads.b[i];
      const std::vector<float> original = param;
      // A unit direction.
      std::vector<double> dir(param.size());
      double norm = 0;
      for (double& v : dir) {
        v = normal(rng);
        norm += v * v;
      }
      norm = std::sqrt(norm);
      double analytic = 0;
      for (size_t e = 0; e < dir.size(); ++e) analytic += (dir[e] /= norm) * grad[e];
      auto shifted = [&](double step) {
        for (size_t e = 0; e < dir.size(); ++e) param[e] = float(original[e] + step * dir[e]);
        const double l = mean_loss(set);
        param = original;
        return l;
      };
      const double numeric = (shifted(eps) - shifted(-eps)) / (2 * eps);
      const double grad_norm = std::sqrt(std::inner_product(grad.begin(), grad.end(), grad.begin(), 0.0));
      const auto& t = set.adapters[i];
      EXPECT_NEAR(analytic, numeric, tolerance * std::max(grad_norm, 1e-3))
          << finetune::kSlotTensors[size_t(t.slot)] << " layer " << t.layer << (which == 0 ? " A" : " B");
      // The largest entry alone.
      const size_t top = size_t(std::max_element(grad.begin(), grad.end(),
                                                 [](float x, float y) { return std::abs(x) < std::abs(y); }) -
                                grad.begin());
      auto entry = [&](double step) {
        param[top] = float(original[top] + step);
        const double l = mean_loss(set);
        param = original;
        return l;
      };
      const double numeric_entry = (entry(eps) - entry(-eps)) / (2 * eps);
      EXPECT_NEAR(grad[top], numeric_entry, tolerance * std::max<double>(std::abs(grad[top]), 1e-3))
          << finetune::kSlotTensors[size_t(t.slot)] << " layer " << t.layer << (which == 0 ? " A" : " B")
          << " entry " << top;
      ++checked;
    }
  }
  EXPECT_EQ(checked, 2 * 2 * 7);
}

TEST(LoraGraph, GradientsMatchFiniteDifferences) {
  auto g = graph();
  ASSERT_NE(g, nullptr);
  const Batch b = make_batch(g->config(), 12, 8);
  expect_gradients_match_finite_differences(*g, b, random_adapters(g->config(), 11), 2e-3);
}

TEST(LoraGraph, GradientsThroughAFourBitBaseMatchFiniteDifferences) {
  GraphOptions options;
  options.base.format = WeightFormat::NF4;
  options.base.block_size = 64;
  options.base.double_quant = true;
  auto g = graph(options);
  ASSERT_NE(g, nullptr);
  const Batch b = make_batch(g->config(), 10, 9);
  const AdapterSet set = random_adapters(g->config(), 12);
  expect_gradients_match_finite_differences(*g, b, set, 1e-2);
  // The 4-bit base is a different function from the float32 one, and smaller.
  auto full = graph();
  EXPECT_NE(full->loss(b, set)->loss_sum, g->loss(b, set)->loss_sum);
  EXPECT_LT(g->memory().base_weight_bytes * 7, full->memory().base_weight_bytes);
}

using test::expect_same_grads;

// QLoRA's memory: once the 4-bit base is made, the model's float32 projections
// can leave the process (inferlab finetune releases them) and nothing changes:
// the graph computes through its own 4-bit copy. A graph on a released model
// needs them and is refused.
TEST(LoraGraph, AFourBitBaseNeedsNoFloatProjections) {
  std::shared_ptr<Model> own = test::load_synthetic(test::lora_graph_spec("lora-graph-release"));  // released below: its own
  ASSERT_NE(own, nullptr);
  GraphOptions options;
  options.base.format = WeightFormat::NF4;
  options.base.block_size = 64;
  auto g = LoraGraph::create(own, options);
  ASSERT_TRUE(g.ok()) << g.message();
  const Batch b = make_batch((*g)->config(), 10, 9);
  const AdapterSet set = random_adapters((*g)->config(), 12);
  AdapterGrads before = AdapterGrads::like(set), after = before;
  auto l0 = (*g)->forward_backward(b, set, before, 0.01f);
  own->release_layer_projections();
  EXPECT_TRUE(own->projections_released());
  EXPECT_TRUE(own->weights().layers[1].w_down.empty());
  auto l1 = (*g)->forward_backward(b, set, after, 0.01f);
  ASSERT_TRUE(l0.ok() && l1.ok());
  EXPECT_EQ(l0->loss_sum, l1->loss_sum);
  expect_same_grads(before, after);
  auto refused = LoraGraph::create(own, options);
  ASSERT_FALSE(refused.ok());
  EXPECT_NE(refused.message().find("float32 projections were released"), std::string::npos) << refused.message();
}

TEST(LoraGraph, CheckpointingChangesNoBitAndLossChunksOnlyRounding) {
  GraphOptions plain, checkpointed, one_row;
  checkpointed.checkpoint_layers = true;
  one_row.loss_chunk_rows = 1;
  auto g0 = graph(plain), g1 = graph(checkpointed), g2 = graph(one_row);
  const Batch b = make_batch(g0->config(), 24, 10);
  const AdapterSet set = random_adapters(g0->config(), 13);
  AdapterGrads r0 = AdapterGrads::like(set), r1 = r0, r2 = r0;
  auto l0 = g0->forward_backward(b, set, r0, 0.01f), l1 = g1->forward_backward(b, set, r1, 0.01f),
       l2 = g2->forward_backward(b, set, r2, 0.01f);
  ASSERT_TRUE(l0.ok() && l1.ok() && l2.ok());
  EXPECT_EQ(l0->loss_sum, l1->loss_sum);
  expect_same_grads(r0, r1);
  // One row of logits at a time runs other GEMM shapes: the same sums, rounded differently.
  EXPECT_NEAR(l0->loss_sum, l2->loss_sum, 1e-6 * l0->loss_sum);
  for (size_t i = 0; i < r0.a.size(); ++i) {
    EXPECT_LT(test::normalized_max_error(r0.a[i], r2.a[i]), 1e-5) << "A of adapter " << i;
    EXPECT_LT(test::normalized_max_error(r0.b[i], r2.b[i]), 1e-5) << "B of adapter " << i;
  }
  // Checkpointing keeps less: one layer's activations plus every layer's input.
  EXPECT_LT(g1->memory().peak_activation_bytes, g0->memory().peak_activation_bytes);
  // Gradients accumulate: a second call adds the same amount again.
  AdapterGrads twice = r0;
  ASSERT_TRUE(g0->forward_backward(b, set, twice, 0.01f).ok());
  for (size_t i = 0; i < r0.a.size(); ++i)
    for (size_t e = 0; e < r0.a[i].size(); ++e) EXPECT_FLOAT_EQ(twice.a[i][e], 2 * r0.a[i][e]);
}

TEST(LoraGraph, DropoutMasksRepeatWithTheirSeed) {
  GraphOptions options;
  options.dropout = 0.3f;
  auto g = graph(options);
  options.checkpoint_layers = true;
  auto gc = graph(options);
  auto plain = graph();
  const Batch b = make_batch(g->config(), 12, 14);
  const AdapterSet set = random_adapters(g->config(), 15);
  AdapterGrads a = AdapterGrads::like(set), same = a, other = a, checkpointed = a, none = a;
  ASSERT_TRUE(g->forward_backward(b, set, a, 0.05f, 1).ok());
  ASSERT_TRUE(g->forward_backward(b, set, same, 0.05f, 1).ok());
  ASSERT_TRUE(gc->forward_backward(b, set, checkpointed, 0.05f, 1).ok());
  ASSERT_TRUE(g->forward_backward(b, set, other, 0.05f, 2).ok());
  ASSERT_TRUE(plain->forward_backward(b, set, none, 0.05f, 1).ok());
  expect_same_grads(a, same);
  expect_same_grads(a, checkpointed);  // the rerun layer draws the same masks
  EXPECT_NE(a.a[0], other.a[0]);
  EXPECT_NE(a.a[0], none.a[0]);
  // Dropout acts on the adapters' input only: with B = 0 the loss is the base's whatever the mask.
  finetune::AdapterInit init;
  init.slots = {0, 6};
  auto fresh = finetune::init_adapters(g->config(), init);
  AdapterGrads f = AdapterGrads::like(*fresh);
  EXPECT_EQ(g->forward_backward(b, *fresh, f, 1.0f, 3)->loss_sum, plain->loss(b, *fresh)->loss_sum);
}

// The mechanisms early-exit training plugs in: a weighted loss per exit
// (CALM) and positions that skip layers (SkipDecode's schedule).
TEST(LoraGraph, ExitLossesAndSkippedLayersAreWhatTheirDefinitionsSay) {
  const AdapterSet set = random_adapters(tiny_model()->config(), 18);
  const Batch b = make_batch(tiny_model()->config(), 12, 19);
  GraphOptions last_only, first_only;
  last_only.exit_weights = {0.0f, 1.0f};
  first_only.exit_weights = {1.0f, 0.0f};
  auto plain = graph(), g_last = graph(last_only), g_first = graph(first_only);
  // Only the last exit weighted: the plain loss, bit for bit.
  EXPECT_EQ(g_last->loss(b, set)->loss_sum, plain->loss(b, set)->loss_sum);
  // Every position skipping the last layer: the loss of the first layer's exit.
  Batch skip_last = b;
  skip_last.skip.assign(b.tokens.size() * 2, 0);
  for (size_t r = 0; r < b.tokens.size(); ++r) skip_last.skip[r * 2 + 1] = 1;
  EXPECT_EQ(plain->loss(skip_last, set)->loss_sum, g_first->loss(b, set)->loss_sum);
  EXPECT_NE(plain->loss(skip_last, set)->loss_sum, plain->loss(b, set)->loss_sum);
  // Both exits: the weighted sum, each exit's loss reported.
  GraphOptions both;
  both.exit_weights = {0.25f, 1.0f};
  auto g_both = graph(both);
  auto r = g_both->loss(b, set);
  ASSERT_EQ(r->exit_loss_sums.size(), 2u);
  EXPECT_DOUBLE_EQ(r->exit_loss_sums[0], g_first->loss(b, set)->loss_sum);
  EXPECT_DOUBLE_EQ(r->exit_loss_sums[1], plain->loss(b, set)->loss_sum);
  EXPECT_NEAR(r->loss_sum, 0.25 * r->exit_loss_sums[0] + r->exit_loss_sums[1], 1e-9 * r->loss_sum);

  // Gradients of both against finite differences: two exits, and a schedule in
  // which later positions of each sequence skip the first layer (as SkipDecode
  // runs the top layers only), a few the last one too.
  Batch scheduled = b;
  scheduled.skip.assign(b.tokens.size() * 2, 0);
  for (int64_t s = 0; s < b.sequences; ++s)
    for (int64_t t = 6; t < b.seq_len; ++t) {
      scheduled.skip[size_t((s * b.seq_len + t) * 2)] = 1;
      if (t >= 10) scheduled.skip[size_t((s * b.seq_len + t) * 2 + 1)] = 1;
    }
  expect_gradients_match_finite_differences(*g_both, scheduled, set, 2e-3);

  // Checkpointing with both: the same gradients, bit for bit.
  both.checkpoint_layers = true;
  auto g_ckpt = graph(both);
  AdapterGrads x = AdapterGrads::like(set), y = x;
  ASSERT_TRUE(g_both->forward_backward(scheduled, set, x, 0.01f).ok());
  ASSERT_TRUE(g_ckpt->forward_backward(scheduled, set, y, 0.01f).ok());
  expect_same_grads(x, y);

  GraphOptions bad;
  bad.exit_weights = {1.0f};
  EXPECT_NE(LoraGraph::create(tiny_model(), bad).message().find("1 exit weights for 2 layers"), std::string::npos);
  bad.exit_weights = {0.0f, 0.0f};
  EXPECT_FALSE(LoraGraph::create(tiny_model(), bad).ok());
  Batch wrong = b;
  wrong.skip.assign(5, 0);
  EXPECT_FALSE(plain->loss(wrong, set).ok());
}

// GraphOptions::cuda without a GPU, or in a build without the CUDA backend:
// refused by name, never a crash (tests/gpu/test_cuda_lora_graph.cpp covers
// the CUDA graph itself).
TEST(LoraGraph, ACudaGraphWithoutAGpuIsRefusedByName) {
  if (cuda_device_count() > 0) GTEST_SKIP() << "a GPU is present";
  GraphOptions options;
  options.cuda = true;
  const auto g = LoraGraph::create(tiny_model(), options);
  ASSERT_FALSE(g.ok());
  const std::string expected = cuda_compiled() ? "fine-tuning on CUDA: no CUDA GPU" : "needs a build with the CUDA backend";
  EXPECT_NE(g.message().find(expected), std::string::npos) << g.message();
}

TEST(LoraGraph, InitializationFollowsPeft) {
  const ModelConfig& c = tiny_model()->config();
  finetune::AdapterInit init;
  init.rank = 8;
  init.alpha = 16;
  init.slots = {1, 4};
  init.layers = {1};
  auto set = finetune::init_adapters(c, init);
  ASSERT_TRUE(set.ok()) << set.message();
  ASSERT_EQ(set->adapters.size(), 2u);
  for (const auto& t : set->adapters) {
    EXPECT_EQ(t.layer, 1);
    EXPECT_FLOAT_EQ(t.scale, 2.0f);
    const float bound = 1.0f / std::sqrt(float(t.in));
    float largest = 0;
    for (float v : t.a) largest = std::max(largest, std::abs(v));
    EXPECT_LE(largest, bound);
    EXPECT_GT(largest, 0.8f * bound);
    EXPECT_EQ(t.b, std::vector<float>(t.b.size(), 0.0f));
  }
  EXPECT_EQ(set->parameter_count(), 8 * (c.n_embd + c.kv_dim()) + 8 * (c.n_embd + c.n_ff));
  init.rslora = true;
  EXPECT_FLOAT_EQ(finetune::init_adapters(c, init)->adapters[0].scale, 16.0f / std::sqrt(8.0f));
  // The same seed, the same adapters.
  init.rslora = false;
  EXPECT_EQ(finetune::init_adapters(c, init)->adapters[1].a, set->adapters[1].a);
}

TEST(LoraGraph, BadBatchesAndAdaptersAreRefusedWithTheirNumbers) {
  auto g = graph();
  const ModelConfig& c = g->config();
  const AdapterSet set = random_adapters(c, 16);
  auto message = [&](const Batch& b, const AdapterSet& s) {
    auto r = g->loss(b, s);
    EXPECT_FALSE(r.ok());
    return r.ok() ? std::string() : r.message();
  };
  Batch b = make_batch(c, 8, 17);
  Batch long_batch = b;
  long_batch.seq_len = c.context_length + 1;
  EXPECT_NE(message(long_batch, set).find("exceeds the model's context of 1024"), std::string::npos);
  Batch bad_token = b;
  bad_token.tokens[5] = c.n_vocab;
  EXPECT_NE(message(bad_token, set).find("token " + std::to_string(c.n_vocab) + " at position 5"), std::string::npos);
  Batch short_targets = b;
  short_targets.targets.pop_back();
  EXPECT_NE(message(short_targets, set).find("15 targets"), std::string::npos);
  AdapterSet wrong = set;
  wrong.adapters[2].b.pop_back();
  EXPECT_NE(message(b, wrong).find("adapter 2 (attn_v of layer 0)"), std::string::npos);
  AdapterSet twice = set;
  twice.adapters.push_back(set.adapters[0]);
  EXPECT_NE(message(b, twice).find("two adapters on attn_q of layer 0"), std::string::npos);
  AdapterGrads grads;
  auto r = g->forward_backward(b, set, grads, 1.0f);
  ASSERT_FALSE(r.ok());
  EXPECT_NE(r.message().find("AdapterGrads::like"), std::string::npos);

  finetune::AdapterInit init;
  init.slots = {0};
  init.layers = {2};
  EXPECT_NE(finetune::init_adapters(c, init).message().find("layer 2 is outside the model's 2 layers"),
            std::string::npos);
  init.layers = {};
  init.rank = 100;
  EXPECT_FALSE(finetune::init_adapters(c, init).ok());
  GraphOptions options;
  options.dropout = 1.0f;
  EXPECT_FALSE(LoraGraph::create(tiny_model(), options).ok());
}

}  // namespace test_lora_graph
}  // namespace inferlab
