// Continuous batching under a KV budget (engine/batch_scheduler.h): the
// budget is never exceeded, the newest sequence is preempted and later
// recomputes its prompt and generated tokens, admission is first come first
// served, a request that cannot fit alone is refused with the numbers, and
// under random arrivals and completions every request finishes (no
// preemption livelock).
#include <gtest/gtest.h>

#include <map>
#include <random>

#include "engine/batch_scheduler.h"

namespace inferlab {
namespace test_batch_scheduler {

// Pages of 16 tokens, one table per sequence.
int64_t pages16(int64_t tokens) { return (tokens + 15) / 16; }

BatchScheduler scheduler(int64_t budget, int32_t max_batch, BatchScheduler::PagesFor f = pages16) {
  auto s = BatchScheduler::create(budget, max_batch, std::move(f));
  EXPECT_TRUE(s.ok()) << (s.ok() ? "" : s.message());
  return std::move(*s);
}

TEST(BatchScheduler, PrefillThenOneDecodeTokenPerStepUntilMaxNewTokens) {
  BatchScheduler s = scheduler(100, 4);
  ASSERT_TRUE(s.add({1, 20, 3}).ok());
  BatchStep a = s.next_step();
  ASSERT_EQ(a.run.size(), 1u);
  EXPECT_TRUE(a.run[0].prefill);
  EXPECT_EQ(a.run[0].tokens, 20);
  EXPECT_EQ(a.admitted, std::vector<int64_t>{1});
  s.complete(a);  // 1 token generated
  BatchStep b = s.next_step();
  EXPECT_FALSE(b.run[0].prefill);
  EXPECT_EQ(b.run[0].tokens, 1);
  s.complete(b);  // 2
  s.complete(s.next_step());  // 3: done
  EXPECT_TRUE(s.idle());
  EXPECT_TRUE(s.next_step().run.empty());
}

TEST(BatchScheduler, TheNewestSequenceIsPreemptedAndRecomputesWhatItHad) {
  // Budget 4 pages: two sequences of 32-token prompts fill it; growing past
  // 32 tokens needs a third page each.
  BatchScheduler s = scheduler(4, 8);
  ASSERT_TRUE(s.add({1, 32, 8}).ok());
  ASSERT_TRUE(s.add({2, 32, 8}).ok());
  BatchStep first = s.next_step();
  EXPECT_EQ(first.admitted, (std::vector<int64_t>{1, 2}));
  EXPECT_EQ(first.pages_in_use, 4);
  s.complete(first);
  BatchStep second = s.next_step();  // both would need 3 pages: 2 leaves
  EXPECT_EQ(second.preempted, std::vector<int64_t>{2});
  ASSERT_EQ(second.run.size(), 1u);
  EXPECT_EQ(second.run[0].id, 1);
  EXPECT_LE(second.pages_in_use, 4);
  s.complete(second);
  // Sequence 1 finishes; then 2 comes back and recomputes its prompt and its one generated token.
  BatchStep step;
  for (int guard = 0; guard < 20; ++guard) {
    step = s.next_step();
    if (!step.admitted.empty()) break;
    s.complete(step);
  }
  ASSERT_EQ(step.admitted, std::vector<int64_t>{2});
  ASSERT_EQ(step.run.size(), 1u);
  EXPECT_TRUE(step.run[0].recompute);
  EXPECT_EQ(step.run[0].tokens, 33);
  EXPECT_EQ(s.preemptions(), 1);
}

TEST(BatchScheduler, AdmissionIsFirstComeFirstServedAndRespectsTheBatchSize) {
  BatchScheduler s = scheduler(10, 2);
  ASSERT_TRUE(s.add({1, 100, 4}).ok());  // 7 pages at its longest
  ASSERT_TRUE(s.add({2, 60, 4}).ok());   // 4: does not fit beside 1, so 3 waits behind it
  ASSERT_TRUE(s.add({3, 10, 4}).ok());
  BatchStep a = s.next_step();
  EXPECT_EQ(a.admitted, std::vector<int64_t>{1});
  BatchScheduler t = scheduler(1000, 2);
  for (int64_t id = 1; id <= 5; ++id) ASSERT_TRUE(t.add({id, 10, 4}).ok());
  EXPECT_EQ(t.next_step().run.size(), 2u);
}

TEST(BatchScheduler, ARequestThatCannotFitAloneIsRefusedWithTheNumbers) {
  BatchScheduler s = scheduler(4, 8);
  const Status refused = s.add({7, 60, 10});  // 69 tokens: 5 pages
  ASSERT_FALSE(refused.ok());
  EXPECT_NE(refused.message().find("request 7 (60 prompt + 10 new tokens) needs 5 KV pages at its longest; the budget "
                                   "is 4 pages"),
            std::string::npos)
      << refused.message();
  EXPECT_TRUE(s.idle());
  EXPECT_FALSE(s.add({8, 0, 1}).ok());
  EXPECT_FALSE(BatchScheduler::create(0, 4, pages16).ok());
  EXPECT_FALSE(BatchScheduler::create(10, 0, pages16).ok());
}

// Random requests arriving over time, random early ends, budgets from tight
// to loose, and a page function that caps a sequence (a method that evicts):
// the budget holds after every step, every step with work advances the
// oldest running sequence, and everything finishes.
TEST(BatchScheduler, RandomArrivalsNeverExceedTheBudgetAndAllFinish) {
  int64_t preemptions = 0;
  for (uint64_t seed = 0; seed < 40; ++seed) {
    std::mt19937_64 rng(seed);
    const bool capped = seed % 4 == 3;
    const BatchScheduler::PagesFor pages = capped ? BatchScheduler::PagesFor([](int64_t t) {
      return pages16(std::min<int64_t>(t, 64));
    })
                                                  : BatchScheduler::PagesFor(pages16);
    const int64_t budget = std::uniform_int_distribution<int64_t>(12, 60)(rng);
    BatchScheduler s = scheduler(budget, int32_t(std::uniform_int_distribution<int>(1, 8)(rng)), pages);
    std::map<int64_t, int64_t> remaining;  // id -> new tokens still to come
    std::uniform_int_distribution<int64_t> prompt(1, 150), fresh(1, 60);
    int64_t next_id = 0;
    const int64_t total = 60;
    int64_t steps = 0;
    while ((next_id < total || !s.idle()) && steps < 100000) {
      if (next_id < total && rng() % 3 == 0) {  // an arrival
        const BatchRequest r{next_id++, prompt(rng), fresh(rng)};
        if (s.add(r).ok()) remaining[r.id] = r.max_new_tokens;
        else EXPECT_GT(pages(r.prompt_tokens + r.max_new_tokens - 1), budget);  // refused only when it cannot fit
      }
      const BatchStep step = s.next_step();
      ++steps;
      ASSERT_LE(step.pages_in_use, budget) << "seed " << seed;
      for (const int64_t id : step.preempted)  // the oldest running sequence always advances
        ASSERT_TRUE(step.run.empty() || id != step.run.front().id);
      if (step.run.empty()) {
        ASSERT_TRUE(s.idle()) << "work waiting but nothing runs, seed " << seed;
        continue;
      }
      std::vector<int64_t> ended;
      for (const BatchSlot& slot : step.run)
        if (--remaining[slot.id] == 0 || rng() % 50 == 0) ended.push_back(slot.id);
      s.complete(step, ended);
      ASSERT_LE(s.pages_in_use(), budget) << "seed " << seed;
      for (const int64_t id : ended) remaining.erase(id);
    }
    EXPECT_TRUE(s.idle()) << "seed " << seed << " did not finish in " << steps << " steps";
    EXPECT_EQ(next_id, total);
    preemptions += s.preemptions();
  }
  EXPECT_GT(preemptions, 0);  // the budgets were tight enough to preempt
}

}  // namespace test_batch_scheduler
}  // namespace inferlab
