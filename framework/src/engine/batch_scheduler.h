// Continuous batching under a KV memory budget (vLLM's policy): sequences
// join and leave between steps; a step plans which running sequences advance
// (a prefill of their prompt, or one decode token), admits waiting ones
// first-come first-served while their KV fits, and when the running ones'
// growth no longer fits, preempts the most recently admitted by
// recomputation (its KV is dropped; it waits again at the head of the queue
// and later re-runs its prompt and the tokens it had generated as one
// prefill). The KV a sequence holds is a function the caller gives (a method
// that evicts holds less), in pages.
//
// Guarantees (tests/unit/test_batch_scheduler.cpp): the pages of the running
// sequences after a step never exceed the budget, and every step with work
// advances at least the oldest running sequence, which is never preempted, so
// every request finishes (no preemption livelock). A request that cannot fit
// even alone is refused when it is added, with the numbers.
#pragma once

#include <cstdint>
#include <deque>
#include <functional>
#include <vector>

#include "inferlab/result.h"

namespace inferlab {

struct BatchRequest {
  int64_t id = 0;
  int64_t prompt_tokens = 0;   // >= 1
  int64_t max_new_tokens = 0;  // >= 1
};

// What one step runs for one sequence.
struct BatchSlot {
  int64_t id = 0;
  int64_t tokens = 0;   // new tokens this step: the (re)prefill, or 1 (decode)
  bool prefill = false;
  bool recompute = false;  // a preempted sequence's prefill: prompt and its generated tokens again
};

struct BatchStep {
  std::vector<BatchSlot> run;        // in admission order
  std::vector<int64_t> admitted;     // ids that started (or restarted) this step
  std::vector<int64_t> preempted;    // ids whose KV was dropped this step
  int64_t pages_in_use = 0;          // after the step, of the running sequences
};

class BatchScheduler {
 public:
  // KV pages a sequence holds with `tokens` tokens in its cache.
  using PagesFor = std::function<int64_t(int64_t tokens)>;

  // budget: pages; max_batch: sequences per step (>= 1).
  static Result<BatchScheduler> create(int64_t page_budget, int32_t max_batch, PagesFor pages_for);

  // Queues a request; refused (nothing queued) when its prompt and all its new
  // tokens could not fit in the budget even alone, or it is malformed.
  Status add(const BatchRequest& request);

  // The next step's plan; empty when nothing is waiting or running.
  BatchStep next_step();

  // After the step ran: `finished` ids leave (end of sequence, or EOS).
  // Every running sequence advanced by its slot's tokens; one reaching its
  // max_new_tokens is finished here without being named.
  void complete(const BatchStep& step, const std::vector<int64_t>& finished = {});

  bool idle() const { return waiting_.empty() && running_.empty(); }
  int64_t pages_in_use() const;
  int64_t preemptions() const { return preemptions_; }
  int64_t waiting() const { return int64_t(waiting_.size()); }
  int64_t running() const { return int64_t(running_.size()); }

 private:
  struct Sequence {
    BatchRequest request;
    int64_t cached = 0;     // tokens in its KV cache
    int64_t generated = 0;  // new tokens produced so far (kept across a preemption)
    bool restarted = false;
  };
  BatchScheduler(int64_t budget, int32_t max_batch, PagesFor pages_for)
      : budget_(budget), max_batch_(max_batch), pages_for_(std::move(pages_for)) {}
  // Tokens in the cache after its next step.
  int64_t next_tokens(const Sequence& s) const;

  int64_t budget_;
  int32_t max_batch_;
  PagesFor pages_for_;
  std::deque<Sequence> waiting_;
  std::vector<Sequence> running_;  // admission order: the oldest first
  int64_t preemptions_ = 0;
};

}  // namespace inferlab
