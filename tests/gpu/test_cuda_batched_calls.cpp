// Batched calls on the CUDA backend (Engine::forward_batch, focus_segment):
// three sequences of different prompt lengths, prefilled in one call and then
// decoded in one call a step, give the logits each gives alone (within f16
// rounding: a GEMM over more rows may sum in another order), also with a
// layer every plan skips (the skipped layer's K/V appended per segment), and
// leave each sequence's cache as alone (its next step alone, a replayed
// graph, matches), also when a larger batch grows the staging slots; with
// graphs on, the batched decode steps are captured and replayed; bad
// segments and focus misuse are errors. A sequence that
// exits early by confidence stays in its batched call as a frozen row: its
// logits, K/V fill and counters are those it has alone.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "engine/backend_factory.h"
#include "engine/engine.h"
#include "exit_test_methods.h"
#include "gpu_engine_support.h"
#include "gpu_test_support.h"
#include "plugin_test_support.h"

namespace inferlab {
namespace test_cuda_batched_calls {

using gpu_test::make_engine;
using gpu_test::small_model;

constexpr int kSteps = 4;
constexpr double kLogitTolerance = 2e-2;  // absolute: the synthetic model's logits are of order 1

using Rows = std::vector<std::vector<float>>;  // per sequence: its logits rows, concatenated
using Sequences = std::vector<std::unique_ptr<KvSequence>>;

// Across page boundaries (16 tokens), and one shorter than a page.
std::vector<std::vector<int32_t>> prompts(int32_t vocab) {
  return {test::random_tokens(vocab, 37, 1), test::random_tokens(vocab, 5, 2), test::random_tokens(vocab, 70, 3)};
}

LogitsSink append_to(std::vector<float>& rows) {
  return [&rows](int64_t, std::span<const float> l) { rows.insert(rows.end(), l.begin(), l.end()); };
}

// Each sequence alone: its prompt, then kSteps decode tokens (`next`).
Rows run_alone(Engine& engine, const std::vector<std::vector<int32_t>>& p, const std::vector<int32_t>& next,
               Sequences& seqs) {
  Rows out(p.size());
  for (size_t i = 0; i < p.size(); ++i) {
    seqs.push_back(engine.new_sequence());
    EXPECT_TRUE(engine.forward(*seqs[i], p[i], 0, append_to(out[i])).ok());
    for (int s = 0; s < kSteps; ++s)
      EXPECT_TRUE(engine.forward(*seqs[i], std::vector<int32_t>{next[size_t(s)]}, 0, append_to(out[i])).ok());
  }
  return out;
}

// The same as batches: every prompt in the first call, then one call a step.
Rows run_batched(Engine& engine, const std::vector<std::vector<int32_t>>& p, const std::vector<int32_t>& next,
                 Sequences& seqs) {
  Rows out(p.size());
  for (size_t i = 0; i < p.size(); ++i) seqs.push_back(engine.new_sequence());
  std::vector<std::vector<int32_t>> tokens(p.size());
  for (int s = -1; s < kSteps; ++s) {
    std::vector<Engine::BatchItem> items;
    for (size_t i = 0; i < p.size(); ++i) {
      tokens[i] = s < 0 ? p[i] : std::vector<int32_t>{next[size_t(s)]};
      items.push_back({seqs[i].get(), tokens[i], 0, append_to(out[i])});
    }
    auto st = engine.forward_batch(items);
    EXPECT_TRUE(st.ok()) << (st.ok() ? "" : st.message());
  }
  return out;
}

double max_abs_difference(const std::vector<float>& a, const std::vector<float>& b) {
  double worst = 0;
  for (size_t i = 0; i < a.size() && i < b.size(); ++i) worst = std::max(worst, std::abs(double(a[i]) - double(b[i])));
  return worst;
}

void expect_same_logits(const Rows& batched, const Rows& alone) {
  ASSERT_EQ(batched.size(), alone.size());
  for (size_t i = 0; i < alone.size(); ++i) {
    ASSERT_EQ(batched[i].size(), alone[i].size()) << "sequence " << i;
    EXPECT_LT(max_abs_difference(batched[i], alone[i]), kLogitTolerance) << "sequence " << i;
  }
}

TEST(CudaBatchedCalls, LogitsInsideABatchEqualThoseAlone) {
  INFERLAB_REQUIRE_GPU();
  for (const bool graphs : {false, true}) {  // with graphs the sequences alone replay their decode steps
    SCOPED_TRACE(graphs ? "graphs" : "no graphs");
    auto engine = make_engine(small_model(), BackendKind::Cuda, 16, GpuDType::F16, graphs);
    ASSERT_NE(engine, nullptr);
    const auto p = prompts(engine->config().n_vocab);
    const auto next = test::random_tokens(engine->config().n_vocab, kSteps + 1, 4);
    Sequences alone_seqs, batched_seqs;
    const Rows alone = run_alone(*engine, p, next, alone_seqs);
    if (graphs) {
      EXPECT_GT(engine->counters().graph_replays, 0);
    }
    engine->reset_counters();
    const Rows batched = run_batched(*engine, p, next, batched_seqs);
    expect_same_logits(batched, alone);
    const EngineCounters& c = engine->counters();
    EXPECT_EQ(c.batched_calls, 1 + kSteps);
    EXPECT_EQ(c.batched_sequences, 3 * (1 + kSteps));
    EXPECT_EQ(c.batch_fallbacks, 0);
    // With graphs every batched decode step is one graph (captured at the first).
    EXPECT_EQ(c.graph_replays, graphs ? 3 * kSteps : 0);
    EXPECT_EQ(c.forward_calls, 3 * (1 + kSteps));

    // One more step of each alone, from either history: the batched calls
    // left each sequence's pages and the device page tables as alone did.
    for (size_t i = 0; i < p.size(); ++i) {
      std::vector<float> a, b;
      const std::vector<int32_t> token = {next[kSteps]};
      ASSERT_TRUE(engine->forward(*alone_seqs[i], token, 0, append_to(a)).ok());
      ASSERT_TRUE(engine->forward(*batched_seqs[i], token, 0, append_to(b)).ok());
      ASSERT_EQ(a.size(), b.size());
      EXPECT_LT(max_abs_difference(b, a), kLogitTolerance) << "sequence " << i << " after the batches";
      EXPECT_EQ(batched_seqs[i]->n_past(), alone_seqs[i]->n_past());
    }
  }
}

// Staging slots grow with the batch: a batch of two, then one of four (the
// slots' regions move and every page table uploads again), then the first
// two once more; each gives its sequences' logits alone.
TEST(CudaBatchedCalls, StagingSlotsGrowWithTheBatch) {
  INFERLAB_REQUIRE_GPU();
  for (const bool graphs : {false, true}) {  // with graphs: each batch size its own graph, dropped as slots move
    SCOPED_TRACE(graphs ? "graphs" : "no graphs");
    auto engine = make_engine(small_model(), BackendKind::Cuda, 16, GpuDType::F16, graphs);
    ASSERT_NE(engine, nullptr);
    const int32_t vocab = engine->config().n_vocab;
    auto p = prompts(vocab);
    p.push_back(test::random_tokens(vocab, 21, 5));
    const auto next = test::random_tokens(vocab, kSteps + 1, 6);
    const std::vector<std::vector<int32_t>> two(p.begin(), p.begin() + 2);
    Sequences alone2, alone4, batched2, batched4;
    const Rows a2 = run_alone(*engine, two, next, alone2), a4 = run_alone(*engine, p, next, alone4);
    engine->reset_counters();
    expect_same_logits(run_batched(*engine, two, next, batched2), a2);
    expect_same_logits(run_batched(*engine, p, next, batched4), a4);
    Rows again(2), alone_again(2);
    const std::vector<int32_t> token = {next[kSteps]};
    std::vector<Engine::BatchItem> items;
    for (size_t i = 0; i < 2; ++i) items.push_back({batched2[i].get(), token, 0, append_to(again[i])});
    ASSERT_TRUE(engine->forward_batch(items).ok());
    EXPECT_EQ(engine->counters().graph_replays, graphs ? (2 + 4) * kSteps + 2 : 0);
    for (size_t i = 0; i < 2; ++i)
      ASSERT_TRUE(engine->forward(*alone2[i], token, 0, append_to(alone_again[i])).ok());
    expect_same_logits(again, alone_again);
  }
}

// Every plan skips layer 1, filling its K/V from the hidden state: the
// batched call projects them for every row and appends them per segment.
TEST(CudaBatchedCalls, ASharedSkippedLayerRunsBatched) {
  INFERLAB_REQUIRE_GPU();
  class SkipLayerOne final : public Method {
   public:
    bool plan_layers(const StepInfo&, LayerPlan& plan) override {
      plan.run[1] = 0;
      return true;
    }
  } method;
  auto engine = make_engine(small_model(), BackendKind::Cuda, 16, GpuDType::F16, false);
  ASSERT_NE(engine, nullptr);
  ASSERT_TRUE(engine->set_method(&method, hooks_of<SkipLayerOne>()).ok());
  const auto p = prompts(engine->config().n_vocab);
  const auto next = test::random_tokens(engine->config().n_vocab, kSteps, 5);
  Sequences alone_seqs, batched_seqs;
  const Rows alone = run_alone(*engine, p, next, alone_seqs);
  const EngineCounters a = engine->counters();
  engine->reset_counters();
  const Rows batched = run_batched(*engine, p, next, batched_seqs);
  const EngineCounters& b = engine->counters();
  EXPECT_EQ(b.batched_calls, 1 + kSteps);
  EXPECT_EQ(b.batch_fallbacks, 0);
  EXPECT_EQ(b.layers_skipped, a.layers_skipped);
  EXPECT_EQ(b.kv_fills_propagated, a.kv_fills_propagated);
  expect_same_logits(batched, alone);
  EXPECT_TRUE(engine->set_method(nullptr, 0).ok());
}

using test::ExitByParity;
using test::near_identity_heads;
using test::policy_checking;

// Inside a batched call an exited sequence stays as a frozen row (the CUDA
// backend's stash_segment, and its exit ops on the focused segment's last row
// with an exit state per segment): its logits, K/V fill and counters are those
// it has alone, while the call runs every layer for the sequence that does
// not exit.
TEST(CudaBatchedCalls, ExitsInsideABatchEqualThoseAlone) {
  INFERLAB_REQUIRE_GPU();
  const ModelConfig& c = small_model()->config();
  for (const ExitMeasure measure : {ExitMeasure::State, ExitMeasure::Softmax, ExitMeasure::Classifier}) {
    SCOPED_TRACE(int(measure));
    ExitByParity method;
    method.policy = policy_checking(c, measure, {1, 2});
    method.policy.heads = near_identity_heads(c);
    auto engine = make_engine(small_model(), BackendKind::Cuda, 16, GpuDType::F16, false);
    ASSERT_NE(engine, nullptr);
    Engine& e = *engine;
    {
      const Status s = e.set_method(&method, hooks_of<ExitByParity>());
      ASSERT_TRUE(s.ok()) << s.message();
    }
    const std::vector<int32_t> p = test::random_tokens(c.n_vocab, 21, 6);
    const std::vector<int32_t> next = {3, 9, 4, 7};  // the last: one more step of each alone, after the batches
    // Four sequences of consecutive ids: two alone, then two in batches, each an alone twin of its parity.
    Sequences seqs;
    for (int i = 0; i < 4; ++i) seqs.push_back(e.new_sequence());
    ASSERT_EQ(seqs[0]->id() % 2, seqs[2]->id() % 2);
    ASSERT_EQ(seqs[1]->id() % 2, seqs[3]->id() % 2);
    ASSERT_NE(seqs[0]->id() % 2, seqs[1]->id() % 2);
    Rows out(4);
    for (size_t i : {size_t(0), size_t(1)}) {
      ASSERT_TRUE(e.forward(*seqs[i], p, int64_t(p.size()) - 1, append_to(out[i])).ok());
      for (size_t s = 0; s + 1 < next.size(); ++s)
        ASSERT_TRUE(e.forward(*seqs[i], std::vector<int32_t>{next[s]}, 0, append_to(out[i])).ok());
    }
    const EngineCounters alone = e.counters();
    e.reset_counters();
    const int64_t last = int64_t(p.size()) - 1;  // the prompt's logits: its last row
    {
      auto st = e.forward_batch(std::vector<Engine::BatchItem>{{seqs[2].get(), p, last, append_to(out[2])},
                                                               {seqs[3].get(), p, last, append_to(out[3])}});
      ASSERT_TRUE(st.ok()) << st.message();
    }
    for (size_t s = 0; s + 1 < next.size(); ++s) {
      const std::vector<int32_t> one = {next[s]};
      auto st = e.forward_batch(std::vector<Engine::BatchItem>{{seqs[2].get(), one, 0, append_to(out[2])},
                                                               {seqs[3].get(), one, 0, append_to(out[3])}});
      ASSERT_TRUE(st.ok()) << st.message();
    }
    const EngineCounters& batched = e.counters();
    test::expect_exit_counters_as_alone(batched, alone, 4, c.n_layers);
    ASSERT_GT(alone.exits_after_layer.size(), 1u);
    EXPECT_EQ(alone.exits_after_layer[1], int64_t(next.size()) - 1) << "the even sequence exits at every decode step";
    for (size_t i : {size_t(0), size_t(1)}) {
      ASSERT_EQ(out[i + 2].size(), out[i].size()) << "sequence " << i;
      EXPECT_LT(max_abs_difference(out[i + 2], out[i]), kLogitTolerance) << "sequence " << i;
      // One more step of each alone, from either history: the frozen row's
      // K/V fill left its cache as alone did.
      std::vector<float> a, b;
      const std::vector<int32_t> token = {next.back()};
      ASSERT_TRUE(e.forward(*seqs[i], token, 0, append_to(a)).ok());
      ASSERT_TRUE(e.forward(*seqs[i + 2], token, 0, append_to(b)).ok());
      ASSERT_EQ(a.size(), b.size());
      EXPECT_LT(max_abs_difference(b, a), kLogitTolerance) << "sequence " << i << " after the batches";
      EXPECT_EQ(seqs[i + 2]->n_past(), seqs[i]->n_past());
    }
    EXPECT_TRUE(e.set_method(nullptr, 0).ok());
  }
}

// stash_segment needs a focused segment, and a restore something stashed.
TEST(CudaBatchedCalls, StashingASegmentNeedsAFocusAndRestoringAStash) {
  INFERLAB_REQUIRE_GPU();
  EngineOptions options;
  options.backend = BackendKind::Cuda;
  auto made = make_cuda_backend(small_model(), options, 256);
  ASSERT_TRUE(made.ok()) << made.message();
  Backend& backend = **made;
  const std::vector<int32_t> tokens = {1, 2, 3, 4, 5};
  const std::vector<CallSegment> segments = {{0, 3, 0}, {3, 2, 0}};
  ASSERT_TRUE(backend.begin_call({tokens, 0, false, segments}).ok());
  ASSERT_TRUE(backend.embed().ok());
  auto unfocused = backend.stash_segment(false);
  ASSERT_FALSE(unfocused.ok());
  EXPECT_EQ(unfocused.message().rfind("cuda backend: ", 0), 0u) << unfocused.message();
  ASSERT_TRUE(backend.focus_segment(1).ok());
  auto nothing = backend.stash_segment(true);
  ASSERT_FALSE(nothing.ok());
  EXPECT_EQ(nothing.message().rfind("cuda backend: ", 0), 0u) << nothing.message();
  EXPECT_TRUE(backend.stash_segment(false).ok());
  EXPECT_TRUE(backend.stash_segment(true).ok());
  EXPECT_TRUE(backend.unfocus_segment().ok());
  ASSERT_TRUE(backend.focus_segment(0).ok());
  EXPECT_FALSE(backend.stash_segment(true).ok()) << "segment 1's stash is not segment 0's";
  EXPECT_TRUE(backend.unfocus_segment().ok());
  double seconds = 0;
  EXPECT_TRUE(backend.end_call(seconds).ok());
  // A new call forgets the last one's stashes.
  ASSERT_TRUE(backend.begin_call({tokens, 0, false, segments}).ok());
  ASSERT_TRUE(backend.focus_segment(1).ok());
  EXPECT_FALSE(backend.stash_segment(true).ok());
  EXPECT_TRUE(backend.unfocus_segment().ok());
  EXPECT_TRUE(backend.end_call(seconds).ok());
}

TEST(CudaBatchedCalls, SegmentsAreCheckedAndFocusedOneAtATime) {
  INFERLAB_REQUIRE_GPU();
  EngineOptions options;
  options.backend = BackendKind::Cuda;
  auto made = make_cuda_backend(small_model(), options, 256);
  ASSERT_TRUE(made.ok()) << made.message();
  Backend& backend = **made;
  EXPECT_TRUE(backend.supports(Feature::BatchedCalls));
  const std::vector<int32_t> tokens = {1, 2, 3, 4, 5};
  const std::vector<std::vector<CallSegment>> bad = {
      {{0, 2, 0}, {3, 2, 0}},  // a gap
      {{0, 2, 0}, {2, 2, 9}},  // a row left over
      {{0, 0, 0}, {0, 5, 0}},  // an empty segment
      {{0, 3, 0}, {3, 4, 0}},  // past the call's rows
  };
  for (const auto& segments : bad) {
    auto s = backend.begin_call({tokens, 0, false, segments});
    ASSERT_FALSE(s.ok());
    EXPECT_NE(s.message().find("cuda backend"), std::string::npos) << s.message();
  }
  const std::vector<CallSegment> good = {{0, 3, 10}, {3, 2, 0}};
  ASSERT_TRUE(backend.begin_call({tokens, 10, false, good}).ok());
  EXPECT_FALSE(backend.unfocus_segment().ok()) << "none is focused";
  EXPECT_FALSE(backend.focus_segment(2).ok());
  EXPECT_FALSE(backend.focus_segment(-1).ok());
  ASSERT_TRUE(backend.focus_segment(1).ok());
  auto twice = backend.focus_segment(0);
  ASSERT_FALSE(twice.ok());
  EXPECT_NE(twice.message().find("another is"), std::string::npos) << twice.message();
  EXPECT_TRUE(backend.unfocus_segment().ok());
  EXPECT_FALSE(backend.unfocus_segment().ok());
  double seconds = 0;
  EXPECT_TRUE(backend.end_call(seconds).ok());
  // A call of one sequence has no segment to focus.
  ASSERT_TRUE(backend.begin_call({tokens, 0, false, {}}).ok());
  EXPECT_FALSE(backend.focus_segment(0).ok());
  EXPECT_TRUE(backend.end_call(seconds).ok());
}

}  // namespace test_cuda_batched_calls
}  // namespace inferlab
