#include "engine/batch_scheduler.h"

#include <fmt/format.h>

#include <algorithm>

namespace inferlab {

// A sequence's cache holds its prompt and every generated token but the
// latest, which the next step feeds: a prefill (fresh, or a recomputation
// after a preemption) feeds all of them at once, a decode step the latest one.
// Either step yields one new token.
int64_t BatchScheduler::next_tokens(const Sequence& s) const {
  return s.cached == 0 ? s.request.prompt_tokens + s.generated : s.cached + 1;
}

Result<BatchScheduler> BatchScheduler::create(int64_t page_budget, int32_t max_batch, PagesFor pages_for) {
  if (page_budget < 1) return Error{fmt::format("batch scheduler: a KV budget of {} pages holds nothing", page_budget)};
  if (max_batch < 1) return Error{fmt::format("batch scheduler: a batch of {} sequences", max_batch)};
  if (!pages_for) return Error{"batch scheduler: no page count for a sequence"};
  return BatchScheduler(page_budget, max_batch, std::move(pages_for));
}

Status BatchScheduler::add(const BatchRequest& r) {
  if (r.prompt_tokens < 1 || r.max_new_tokens < 1)
    return Error{fmt::format("batch scheduler: request {} has {} prompt tokens and {} new tokens (both must be >= 1)",
                             r.id, r.prompt_tokens, r.max_new_tokens)};
  const int64_t peak = r.prompt_tokens + r.max_new_tokens - 1;  // the last token is never fed
  const int64_t pages = pages_for_(peak);
  if (pages > budget_)
    return Error{fmt::format("batch scheduler: request {} ({} prompt + {} new tokens) needs {} KV pages at its "
                             "longest; the budget is {} pages, which cannot hold even this one sequence",
                             r.id, r.prompt_tokens, r.max_new_tokens, pages, budget_)};
  waiting_.push_back(Sequence{r, 0, 0, false});
  return ok_status();
}

int64_t BatchScheduler::pages_in_use() const {
  int64_t used = 0;
  for (const Sequence& s : running_) used += s.cached > 0 ? pages_for_(s.cached) : 0;
  return used;
}

BatchStep BatchScheduler::next_step() {
  BatchStep step;
  // The running sequences' growth; the newest leave (recomputation) until it fits.
  std::vector<int64_t> need(running_.size());
  int64_t used = 0;
  for (size_t i = 0; i < running_.size(); ++i) used += need[i] = pages_for_(next_tokens(running_[i]));
  while (used > budget_ && running_.size() > 1) {  // the oldest alone always fits (add's check)
    Sequence s = std::move(running_.back());
    running_.pop_back();
    used -= need.back();
    need.pop_back();
    step.preempted.push_back(s.request.id);
    ++preemptions_;
    s.cached = 0;
    s.restarted = true;
    waiting_.push_front(std::move(s));
  }
  // Admission, first come first served: the head of the queue waits until its pages are free.
  if (step.preempted.empty()) {
    while (!waiting_.empty() && int64_t(running_.size()) < max_batch_) {
      const int64_t pages = pages_for_(next_tokens(waiting_.front()));
      if (used + pages > budget_) break;
      used += pages;
      need.push_back(pages);
      step.admitted.push_back(waiting_.front().request.id);
      running_.push_back(std::move(waiting_.front()));
      waiting_.pop_front();
    }
  }
  for (const Sequence& s : running_) {
    const bool prefill = s.cached == 0;
    step.run.push_back({s.request.id, next_tokens(s) - s.cached, prefill, prefill && s.restarted});
  }
  step.pages_in_use = used;
  return step;
}

void BatchScheduler::complete(const BatchStep& step, const std::vector<int64_t>& finished) {
  std::vector<Sequence> still;
  for (Sequence& s : running_) {
    const auto slot = std::find_if(step.run.begin(), step.run.end(),
                                   [&](const BatchSlot& b) { return b.id == s.request.id; });
    if (slot != step.run.end()) {
      s.cached += slot->tokens;
      ++s.generated;
    }
    const bool done = s.generated >= s.request.max_new_tokens ||
                      std::find(finished.begin(), finished.end(), s.request.id) != finished.end();
    if (!done) still.push_back(std::move(s));
  }
  running_ = std::move(still);
}

}  // namespace inferlab
