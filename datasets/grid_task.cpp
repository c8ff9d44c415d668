// What the synthetic generation tasks share: the (length, depth, sample) grid,
// per-sample seeds, ids, the context check, and their common parameters.
#include <fmt/format.h>

#include "datasets/task_support.h"

namespace inferlab::tasks {

GridTask::GridTask(std::string name, const TaskParams& params, bool has_depths)
    : max_new_tokens_(int32_t(params.get_int("max_new_tokens"))),
      name_(std::move(name)),
      lengths_(params.get_int_list("lengths")),
      depths_(has_depths ? params.get_float_list("depths") : std::vector<double>{0.0}),
      has_depths_(has_depths),
      samples_(params.get_int("samples")),
      decode_question_(params.has("question") && params.get_string("question") == "decode"),
      answer_logprob_(params.has("answer_logprob") && params.get_bool("answer_logprob")) {}

void GridTask::set_protocol(TaskSample& sample, const BuiltPrompt& built, const std::string& answer) const {
  if (decode_question_) sample.question_tokens = built.tail_tokens;
  if (answer_logprob_) sample.answer = answer;
}

Result<std::vector<TaskSample>> GridTask::samples(const Tokenizer& tok, int32_t max_context, uint64_t seed) const {
  for (int64_t length : lengths_)
    if (length + max_new_tokens_ > max_context)
      return Error{fmt::format("task '{}': length {} plus max_new_tokens {} exceeds max_context {}; use lengths "
                               "of at most {}",
                               name_, length, max_new_tokens_, max_context, max_context - max_new_tokens_)};
  std::vector<TaskSample> out;
  for (int64_t length : lengths_)
    for (double depth : depths_)
      for (int64_t i = 0; i < samples_; ++i) {
        auto sample = make_sample(tok, length, depth, i, seed);
        if (!sample) return sample.error();
        out.push_back(std::move(*sample));
      }
  return out;
}

Result<TaskSample> GridTask::make_sample(const Tokenizer& tok, int64_t length, double depth, int64_t index,
                                         uint64_t seed) const {
  TaskSample sample;
  sample.id = has_depths_ ? fmt::format("len{}-depth{}-s{}", length, param_value_to_string(depth), index)
                          : fmt::format("len{}-s{}", length, index);
  Rng rng(sample_seed(seed, name_ + "/" + seed_key(), {uint64_t(length), double_bits(depth), uint64_t(index)}));
  if (auto s = fill(tok, length, depth, rng, sample); !s)
    return Error{fmt::format("task '{}' sample {}: {}", name_, sample.id, s.message())};
  sample.max_new_tokens = max_new_tokens_;
  sample.tags["context_tokens"] = double(sample.prompt_tokens.size());
  sample.tags["length"] = double(length);  // the nominal length the sample was built for
  if (has_depths_) sample.tags["depth"] = depth;
  return sample;
}

TaskParamSpec question_param() {
  return {ParamSpec::string("question", "prefill", {"prefill", "decode"},
                            "prefill: the whole prompt in one prefill; decode: the context prefilled, then the "
                            "question fed one token per decode step through the method (Quest's passkey protocol)"),
          false};
}

TaskParamSpec answer_logprob_param() {
  return {ParamSpec::boolean("answer_logprob", true,
                             "also teacher-force the answer after the prompt and record its log-probability "
                             "(answer_logprob) and per-digit top-1 accuracy (answer_digit_accuracy)"),
          false};
}

TaskParamSpec lengths_param() {
  return {ParamSpec::integer("lengths", 512, 16, 1 << 24, "prompt lengths in tokens, BOS included"), true};
}

TaskParamSpec depths_param(const std::string& help) {
  return {ParamSpec::real("depths", 0.5, 0.0, 1.0, help), true, {0.0, 0.5, 1.0}};
}

TaskParamSpec samples_param(int64_t default_value, const std::string& help) {
  return {ParamSpec::integer("samples", default_value, 1, 100000, help), false};
}

TaskParamSpec max_new_tokens_param(int64_t default_value) {
  return {ParamSpec::integer("max_new_tokens", default_value, default_value > 0 ? 1 : 0, 4096,
                             default_value > 0 ? "tokens generated per sample"
                                               : "tokens generated per sample; 0: enough for the expected answers"),
          false};
}

}  // namespace inferlab::tasks
