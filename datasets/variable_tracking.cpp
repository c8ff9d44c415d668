// RULER variable tracking (Hsieh et al., 2024): chains of assignments
// "VAR A = 12345 ... VAR B = VAR A ..." spread through filler; the model must
// name every variable of the chain that ends up holding the asked value. Other
// chains, with other values, are distractors.
#include <fmt/format.h>

#include <algorithm>

#include "datasets/task_support.h"

namespace inferlab::tasks {

namespace {

constexpr int kNameLetters = 5;
constexpr int kValueDigits = 5;
constexpr const char* kHead =
    "The text below hides chains of variable assignments. Keep track of the value that each variable is given.";

std::vector<std::string> pick_names(Rng& rng, size_t count) {
  std::vector<std::string> names;
  while (names.size() < count) {
    std::string name;
    for (int i = 0; i < kNameLetters; ++i) name += char('A' + rng.below(26));
    if (std::find(names.begin(), names.end(), name) == names.end()) names.push_back(std::move(name));
  }
  return names;
}

class VariableTrackingTask final : public GridTask {
 public:
  explicit VariableTrackingTask(const TaskParams& p)
      : GridTask("variable_tracking", p, /*has_depths=*/false),
        num_chains_(int32_t(p.get_int("num_chains"))),
        num_hops_(int32_t(p.get_int("num_hops"))) {
    if (max_new_tokens_ == 0) max_new_tokens_ = answer_token_budget(num_hops_ + 1, kNameLetters);
  }

 private:
  std::string seed_key() const override { return fmt::format("{}/{}", num_chains_, num_hops_); }

  // Chain 0 is the one asked about. Each chain's statements sit at sorted
  // random depths, so every assignment comes after the one it copies.
  HaystackSpec haystack(Rng& rng, std::vector<std::string>& expected) const {
    const size_t chain_len = size_t(num_hops_) + 1;
    const auto names = pick_names(rng, size_t(num_chains_) * chain_len);
    std::vector<std::string> values;
    HaystackSpec spec;
    spec.head = kHead;
    for (int32_t c = 0; c < num_chains_; ++c) {
      const std::string value = pick_number(rng, kValueDigits, values);
      std::vector<double> depths(chain_len);
      for (double& d : depths) d = rng.unit();
      std::sort(depths.begin(), depths.end());
      for (size_t k = 0; k < chain_len; ++k) {
        const std::string& var = names[size_t(c) * chain_len + k];
        const std::string source = k == 0 ? value : "VAR " + names[size_t(c) * chain_len + k - 1];
        spec.inserts.emplace_back(depths[k], fmt::format(" VAR {} = {}.", var, source));
        if (c == 0) expected.push_back(var);
      }
    }
    spec.tail = fmt::format(
        "\nQuestion: Which variables are assigned the value {0} in the text above? Answer: The variables assigned "
        "the value {0} are:",
        values[0]);
    return spec;
  }

  Status fill(const Tokenizer& tok, int64_t length, double, Rng& rng, TaskSample& sample) const override {
    HaystackSpec spec = haystack(rng, sample.expected);
    spec.length = int32_t(length);
    auto built = build_haystack(tok, spec, rng);
    if (!built) return built.error();
    set_protocol(sample, *built, "");  // several names in any order: no single continuation to score
    sample.prompt_tokens = std::move(built->tokens);
    sample.tags["num_chains"] = num_chains_;
    sample.tags["num_hops"] = num_hops_;
    return ok_status();
  }

  int32_t num_chains_;
  int32_t num_hops_;
};

}  // namespace

std::vector<TaskParamSpec> variable_tracking_params() {
  return {
      lengths_param(),
      samples_param(4, "samples per length"),
      {ParamSpec::integer("num_chains", 1, 1, 16, "chains of assignments (one asked about, the rest distractors)"),
       false},
      {ParamSpec::integer("num_hops", 4, 1, 32, "assignments copying a variable per chain (chain length - 1)"), false},
      max_new_tokens_param(0),
      question_param(),
  };
}

Result<std::unique_ptr<Task>> make_variable_tracking(const TaskParams& params) {
  return std::unique_ptr<Task>(std::make_unique<VariableTrackingTask>(params));
}

}  // namespace inferlab::tasks
