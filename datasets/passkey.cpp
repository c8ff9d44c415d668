// Pass-key retrieval (Mohtashami & Jaggi, 2023): one random 5-digit key hidden
// in repetitive filler at a relative depth; the prompt ends in a sentence the
// model completes with the key, so even a small base model can answer.
#include <fmt/format.h>

#include "datasets/task_support.h"

namespace inferlab::tasks {

namespace {

constexpr const char* kHead =
    "There is a pass key hidden inside a lot of irrelevant text. Find it and remember it: you will be asked "
    "for it at the end.";
constexpr const char* kTail = "\nWhat is the pass key? The pass key is";

class PasskeyTask final : public GridTask {
 public:
  explicit PasskeyTask(const TaskParams& p) : GridTask("passkey", p, /*has_depths=*/true) {}

 private:
  Status fill(const Tokenizer& tok, int64_t length, double depth, Rng& rng, TaskSample& sample) const override {
    std::vector<std::string> taken;
    const std::string key = pick_number(rng, 5, taken);
    HaystackSpec spec{kHead, kTail, {{depth, fmt::format(" The pass key is {}. Remember it.", key)}},
                      int32_t(length)};
    auto built = build_haystack(tok, spec, rng);
    if (!built) return built.error();
    set_protocol(sample, *built, " " + key);
    sample.prompt_tokens = std::move(built->tokens);
    sample.expected = {key};
    return ok_status();
  }
};

}  // namespace

std::vector<TaskParamSpec> passkey_params() {
  return {
      lengths_param(),
      depths_param("where the key sits in the filler: 0 at the start, 1 at the end (e.g. [0.0, 0.5, 1.0])"),
      samples_param(2, "samples per (length, depth)"),
      max_new_tokens_param(8),
      question_param(),
      answer_logprob_param(),
  };
}

Result<std::unique_ptr<Task>> make_passkey(const TaskParams& params) {
  return std::unique_ptr<Task>(std::make_unique<PasskeyTask>(params));
}

}  // namespace inferlab::tasks
