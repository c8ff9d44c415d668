// RULER needle-in-a-haystack variants (Hsieh et al., 2024): word keys paired
// with 7-digit magic numbers in filler text. `single` hides one needle;
// `multikey` adds distractor needles with other keys and asks for one key;
// `multivalue` gives one key several values, all of which must be produced.
#include <fmt/format.h>

#include "datasets/task_support.h"

namespace inferlab::tasks {

namespace {

constexpr int kValueDigits = 7;
constexpr const char* kHead =
    "Special magic numbers are hidden in the text below. Memorize them, because you will be asked about them "
    "at the end.";

std::string needle(const std::string& key, const std::string& value) {
  return fmt::format(" One of the special magic numbers for {} is: {}.", key, value);
}

class RulerNiahTask final : public GridTask {
 public:
  explicit RulerNiahTask(const TaskParams& p)
      : GridTask("ruler_niah", p, /*has_depths=*/true),
        variant_(p.get_string("variant")),
        num_needles_(variant_ == "single" ? 1 : int32_t(p.get_int("num_needles"))) {
    const int32_t answers = variant_ == "multivalue" ? num_needles_ : 1;
    if (max_new_tokens_ == 0) max_new_tokens_ = answer_token_budget(answers, kValueDigits);
  }

 private:
  std::string seed_key() const override { return fmt::format("{}/{}", variant_, num_needles_); }

  // The target needle goes at `depth`; distractors and further values at random depths.
  HaystackSpec haystack(Rng& rng, double depth, std::vector<std::string>& expected) const {
    const bool multikey = variant_ == "multikey";
    const auto keys = pick_keys(rng, multikey ? size_t(num_needles_) : 1);
    std::vector<std::string> values;
    for (int32_t i = 0; i < num_needles_; ++i) pick_number(rng, kValueDigits, values);
    HaystackSpec spec;
    spec.head = kHead;
    for (int32_t i = 0; i < num_needles_; ++i)
      spec.inserts.emplace_back(i == 0 ? depth : rng.unit(), needle(keys[multikey ? size_t(i) : 0], values[size_t(i)]));
    if (variant_ == "multivalue") {
      spec.tail = fmt::format(
          "\nWhat are all the special magic numbers for {0} mentioned in the text above? The special magic numbers "
          "for {0} are",
          keys[0]);
      expected = values;
    } else {
      spec.tail = fmt::format(
          "\nWhat is the special magic number for {0} mentioned in the text above? The special magic number for {0} "
          "is",
          keys[0]);
      expected = {values[0]};
    }
    return spec;
  }

  Status fill(const Tokenizer& tok, int64_t length, double depth, Rng& rng, TaskSample& sample) const override {
    HaystackSpec spec = haystack(rng, depth, sample.expected);
    spec.length = int32_t(length);
    auto built = build_haystack(tok, spec, rng);
    if (!built) return built.error();
    // One value asked for: its teacher-forced probability is a continuous score.
    set_protocol(sample, *built, sample.expected.size() == 1 ? " " + sample.expected[0] : std::string());
    sample.prompt_tokens = std::move(built->tokens);
    sample.tags["num_needles"] = num_needles_;
    return ok_status();
  }

  std::string variant_;
  int32_t num_needles_;
};

}  // namespace

std::vector<TaskParamSpec> ruler_niah_params() {
  return {
      {ParamSpec::string("variant", "single", {"single", "multikey", "multivalue"},
                         "single: one needle; multikey: distractor needles with other keys; multivalue: one key "
                         "with several values, all expected"),
       false},
      lengths_param(),
      depths_param("where the target needle sits: 0 at the start of the filler, 1 at the end"),
      samples_param(2, "samples per (length, depth)"),
      {ParamSpec::integer("num_needles", 4, 2, 64,
                          "multikey: needles in all (one target); multivalue: values of the key; single: unused"),
       false},
      max_new_tokens_param(0),
      question_param(),
      answer_logprob_param(),
  };
}

Result<std::unique_ptr<Task>> make_ruler_niah(const TaskParams& params) {
  return std::unique_ptr<Task>(std::make_unique<RulerNiahTask>(params));
}

}  // namespace inferlab::tasks
