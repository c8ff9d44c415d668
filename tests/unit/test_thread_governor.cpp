// The thread governor of the CPU backend's decode-sized calls, fed call times:
// it keeps all threads on an idle machine, drops to one when another process
// makes two slower, and comes back when the machine is idle again.
#include <gtest/gtest.h>

#include <unistd.h>

#include <algorithm>
#include <functional>

#include "engine/engine.h"
#include "engine/thread_governor.h"
#include "inferlab/testing/support.h"

namespace inferlab {
namespace test_thread_governor {

// Runs `calls` calls whose time depends on the thread count, the machine's
// other load observed every 8 calls (as the CPU backend does); returns the
// threads of each call.
std::vector<int32_t> drive(ThreadGovernor& g, int calls, double other_cores,
                           const std::function<double(int32_t)>& seconds) {
  std::vector<int32_t> used;
  for (int i = 0; i < calls; ++i) {
    if (i % 8 == 0) g.observe_load(other_cores);
    used.push_back(g.next_call());
    g.record(seconds(used.back()));
  }
  return used;
}

TEST(ThreadGovernor, NeverProbesOnAnIdleMachine) {
  ThreadGovernor g(2);
  const auto used = drive(g, 2000, 0.02, [](int32_t t) { return t == 2 ? 1.0 : 1.6; });
  EXPECT_EQ(g.current(), 2);
  EXPECT_EQ(g.probes(), 0);
  EXPECT_TRUE(std::all_of(used.begin(), used.end(), [](int32_t t) { return t == 2; }));
}

TEST(ThreadGovernor, DropsToOneThreadWhenTwoAreSlowerAndReturnsWhenTheLoadGoes) {
  ThreadGovernor g(2);
  drive(g, 40, 1.0, [](int32_t t) { return t == 2 ? 3.0 : 1.2; });  // a busy core: waits at every region
  EXPECT_EQ(g.current(), 1);
  EXPECT_EQ(g.switches(), 1);
  drive(g, 200, 0.0, [](int32_t t) { return t == 2 ? 1.0 : 1.6; });  // idle again
  EXPECT_EQ(g.current(), 2);
  EXPECT_EQ(g.switches(), 2);
}

TEST(ThreadGovernor, UnderLoadThatDoesNotHurtItKeepsEveryThreadAndProbesLessAndLess) {
  ThreadGovernor g(4);
  const auto used = drive(g, 3000, 1.0, [](int32_t t) { return t == 4 ? 1.0 : 0.95; });  // within the 15% margin
  EXPECT_EQ(g.current(), 4);
  EXPECT_EQ(g.switches(), 0);
  EXPECT_GT(g.probes(), 2);
  EXPECT_LT(std::count(used.begin(), used.end(), 1), 3000 / 50) << "probes should grow rare while the choice holds";
}

TEST(ThreadGovernor, OneThreadIsOneThread) {
  ThreadGovernor g(1);
  const auto used = drive(g, 100, 1.0, [](int32_t) { return 1.0; });
  EXPECT_TRUE(std::all_of(used.begin(), used.end(), [](int32_t t) { return t == 1; }));
  EXPECT_EQ(g.probes(), 0);
}

TEST(ThreadGovernor, OtherLoadIsACoreCountAndStartsAtZero) {
  OtherLoad load;
  EXPECT_EQ(load.sample(), 0.0);  // nothing to compare with yet
  const double later = load.sample();
  EXPECT_GE(later, 0.0);
  EXPECT_LE(later, double(std::max(1L, sysconf(_SC_NPROCESSORS_ONLN))) + 0.5);
}

// The governor may change the thread count between calls: the logits must not
// notice (split-key decode, GEMV slices and quantized tiles all split work the
// same way whatever the count).
TEST(ThreadGovernor, LogitsDoNotDependOnTheThreadCount) {
  SyntheticModelSpec spec;
  spec.name = "threads";
  spec.weight_type = gguf::TensorType::Q4_1;
  spec.n_embd = 128;
  spec.n_ff = 256;
  auto model = test::load_synthetic(spec);
  ASSERT_TRUE(model);
  const auto tokens = test::random_tokens(model->config().n_vocab, 420, 8);
  for (const auto weights : {WeightSource::F32, WeightSource::File}) {
    std::vector<std::vector<float>> runs[2];
    for (const int32_t threads : {1, 2}) {
      auto engine = Engine::create(model, EngineOptions{.n_threads = threads, .weights = weights});
      ASSERT_TRUE(engine.ok());
      auto seq = (*engine)->new_sequence();
      auto keep = [&](int64_t, std::span<const float> l) { runs[threads - 1].emplace_back(l.begin(), l.end()); };
      ASSERT_TRUE((*engine)->forward(*seq, std::span(tokens.data(), 400), 399, keep).ok());
      for (size_t i = 400; i < tokens.size(); ++i)  // 400+ keys: the decode attention splits them
        ASSERT_TRUE((*engine)->forward(*seq, std::span(&tokens[i], 1), 0, keep).ok());
    }
    EXPECT_EQ(runs[0], runs[1]) << weight_source_name(weights);
  }
}

}  // namespace test_thread_governor
}  // namespace inferlab
