// Internals shared by the task generators (not part of the task API): a
// portable seeded RNG, the built-in word list, and the builder that fits
// filler text with inserted needles to an exact token budget.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "datasets/tasks.h"

namespace inferlab::tasks {

// SplitMix64. The standard distributions are implementation-defined, so a
// sample drawn with them could differ between standard libraries; this one
// gives the same samples everywhere.
class Rng {
 public:
  explicit Rng(uint64_t seed) : state_(seed) {}
  uint64_t next();
  uint64_t below(uint64_t n);  // uniform in [0, n), n > 0
  double unit();               // uniform in [0, 1)
  template <typename T>
  void shuffle(std::vector<T>& v) {
    for (size_t i = v.size(); i > 1; --i) std::swap(v[i - 1], v[size_t(below(i))]);
  }

 private:
  uint64_t state_;
};

// A seed for one sample from the run seed and the sample's coordinates, so a
// sample does not change when other lengths or depths are added to the grid.
uint64_t sample_seed(uint64_t seed, std::string_view task, std::initializer_list<uint64_t> parts);
uint64_t double_bits(double d);

// Lowercase English nouns and adjectives (a few hundred, unique).
const std::vector<std::string_view>& word_list();
// `count` distinct keys made of two words, e.g. "silver-lantern".
std::vector<std::string> pick_keys(Rng& rng, size_t count);
// A number with exactly `digits` digits (no leading zero), not in `taken`; added to it.
std::string pick_number(Rng& rng, int digits, std::vector<std::string>& taken);

// Tokens the prompt text encodes to, the way every task encodes it: BOS when the
// tokenizer adds one, and no special-token parsing (generated and corpus text
// must not be able to produce control tokens).
std::vector<int32_t> encode_prompt(const Tokenizer& tok, const std::string& text);
int32_t count_tokens(const Tokenizer& tok, const std::string& piece);  // no BOS
bool adds_bos(const Tokenizer& tok);  // whether encode_prompt starts with BOS

// A prompt of `head`, then filler sentences with `inserts` placed at relative
// depths (0: before all filler, 1: after it), then `tail`. Pieces after the head
// start with a space or newline.
struct HaystackSpec {
  std::string head;
  std::string tail;
  std::vector<std::pair<double, std::string>> inserts;  // (depth in [0, 1], text)
  int32_t length = 0;                                   // target prompt tokens, BOS included
};

struct BuiltPrompt {
  std::string text;
  std::vector<int32_t> tokens;  // never more than spec.length, a few fewer at most
  int32_t tail_tokens = 0;      // the last tokens that encode spec.tail (the question)
};

// Fails when the head, tail and inserts alone do not fit in the length.
Result<BuiltPrompt> build_haystack(const Tokenizer& tok, const HaystackSpec& spec, Rng& rng);

// The synthetic generation tasks: `samples` prompts per (length, depth), each
// from its own seed. A task without depths has the single depth 0 and ids
// without it. Subclasses build one prompt; this class checks lengths against
// the context, names samples, seeds them and tags them.
class GridTask : public Task {
 public:
  GridTask(std::string name, const TaskParams& params, bool has_depths);
  const std::string& name() const override { return name_; }
  TaskKind kind() const override { return TaskKind::Generation; }
  Result<std::vector<TaskSample>> samples(const Tokenizer& tok, int32_t max_context, uint64_t seed) const override;

 protected:
  // Fills prompt_tokens, expected and any extra tags of `sample`.
  virtual Status fill(const Tokenizer& tok, int64_t length, double depth, Rng& rng, TaskSample& sample) const = 0;
  // Parameters besides length and depth that shape a sample, mixed into its seed.
  virtual std::string seed_key() const { return ""; }
  // The protocol options of a haystack prompt (question_param, answer_logprob_param):
  // marks its question tokens, and its teacher-forced answer when it has one.
  void set_protocol(TaskSample& sample, const BuiltPrompt& built, const std::string& answer) const;
  int32_t max_new_tokens_ = 0;  // resolved: subclasses replace an "auto" 0

 private:
  Result<TaskSample> make_sample(const Tokenizer& tok, int64_t length, double depth, int64_t index,
                                 uint64_t seed) const;
  std::string name_;
  std::vector<int64_t> lengths_;
  std::vector<double> depths_;
  bool has_depths_;
  int64_t samples_;
  bool decode_question_ = false;  // question = "decode"
  bool answer_logprob_ = false;
};

// Parameters the generation tasks share.
TaskParamSpec lengths_param();
TaskParamSpec depths_param(const std::string& help);
TaskParamSpec samples_param(int64_t default_value, const std::string& help);
TaskParamSpec max_new_tokens_param(int64_t default_value);
// question = "prefill" | "decode" (TaskSample::question_tokens).
TaskParamSpec question_param();
// answer_logprob = true | false (TaskSample::answer).
TaskParamSpec answer_logprob_param();

// Default for an "auto" (0) max_new_tokens: room for `answers` answers of up to
// `answer_chars` characters each, separated by ", ", plus a margin. Counted in
// characters because a byte-level token is never shorter than one character.
int32_t answer_token_budget(int32_t answers, int32_t answer_chars);

// Tasks' factories; `params` are complete and checked against the catalog.
std::vector<TaskParamSpec> passkey_params();
std::vector<TaskParamSpec> ruler_niah_params();
std::vector<TaskParamSpec> variable_tracking_params();
std::vector<TaskParamSpec> common_words_params();
std::vector<TaskParamSpec> perplexity_params();
std::vector<TaskParamSpec> fidelity_params();
std::vector<TaskParamSpec> throughput_params();
Result<std::unique_ptr<Task>> make_passkey(const TaskParams& params);
Result<std::unique_ptr<Task>> make_ruler_niah(const TaskParams& params);
Result<std::unique_ptr<Task>> make_variable_tracking(const TaskParams& params);
Result<std::unique_ptr<Task>> make_common_words(const TaskParams& params);
Result<std::unique_ptr<Task>> make_perplexity(const TaskParams& params);
Result<std::unique_ptr<Task>> make_fidelity(const TaskParams& params);
Result<std::unique_ptr<Task>> make_throughput(const TaskParams& params);

}  // namespace inferlab::tasks
