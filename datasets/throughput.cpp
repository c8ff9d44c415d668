// The throughput task: a stream of requests (corpus prompts, a fixed number of
// new tokens each) arriving all at once or as a Poisson process, served by
// continuous batching (experiment/throughput.h measures it). A request's
// arrival time is the tag `arrival_s`, drawn from the seed.
#include <fmt/format.h>

#include <cmath>

#include "datasets/task_support.h"

namespace inferlab::tasks {
namespace {

class ThroughputTask final : public Task {
 public:
  explicit ThroughputTask(const TaskParams& p)
      : path_(p.get_string("path")),
        requests_(p.get_int("requests")),
        prompt_tokens_(p.get_int("prompt_tokens")),
        new_tokens_(p.get_int("new_tokens")),
        arrival_(p.get_string("arrival")),
        rate_(p.get_float("rate")) {}

  const std::string& name() const override { return name_; }
  TaskKind kind() const override { return TaskKind::Throughput; }

  Result<std::vector<TaskSample>> samples(const Tokenizer& tok, int32_t max_context, uint64_t seed) const override {
    if (prompt_tokens_ + new_tokens_ > max_context)
      return Error{fmt::format("task 'throughput': prompt_tokens {} plus new_tokens {} exceeds max_context {}",
                               prompt_tokens_, new_tokens_, max_context)};
    const uint64_t s = sample_seed(seed, name_, {uint64_t(requests_), uint64_t(prompt_tokens_)});
    auto windows = corpus_windows(tok, path_, requests_, prompt_tokens_, s);
    if (!windows) return Error{fmt::format("task 'throughput': {}", windows.message())};
    Rng rng(s ^ double_bits(rate_));
    double t = 0;
    std::vector<TaskSample> out;
    for (int64_t i = 0; i < requests_; ++i) {
      if (arrival_ == "poisson" && i > 0) t += -std::log(1.0 - rng.unit()) / rate_;  // exponential gaps
      TaskSample sample;
      sample.id = fmt::format("req{}", i);
      sample.prompt_tokens = std::move((*windows)[size_t(i)]);
      sample.max_new_tokens = int32_t(new_tokens_);
      sample.tags = {{"context_tokens", double(sample.prompt_tokens.size())}, {"arrival_s", t}};
      out.push_back(std::move(sample));
    }
    return out;
  }

 private:
  std::string name_ = "throughput";
  std::string path_;
  int64_t requests_, prompt_tokens_, new_tokens_;
  std::string arrival_;
  double rate_;
};

}  // namespace

std::vector<TaskParamSpec> throughput_params() {
  return {
      {ParamSpec::string("path", "kjv", {},
                         "prompts' corpus: \"kjv\", \"kv_retrieval\" (built in) or a text file path"),
       false},
      {ParamSpec::integer("requests", 16, 1, 100000, "requests in the stream"), false},
      {ParamSpec::integer("prompt_tokens", 128, 2, 1 << 24, "prompt length of each request, BOS included"), false},
      {ParamSpec::integer("new_tokens", 64, 1, 1 << 20, "tokens each request generates (end of sequence ignored)"),
       false},
      {ParamSpec::string("arrival", "all", {"all", "poisson"},
                         "all: every request at time 0; poisson: exponential gaps at `rate`"),
       false},
      {ParamSpec::real("rate", 4.0, 0.0, 1e9, "poisson arrivals: requests per second (> 0)"), false},
      {ParamSpec::real("kv_budget_mb", 0.0, 0.0, 1e9,
                       "KV memory the batch may hold, in MiB of pages (0: no limit but the batch size)"),
       false},
  };
}

Result<std::unique_ptr<Task>> make_throughput(const TaskParams& params) {
  if (params.get_string("arrival") == "poisson" && !(params.get_float("rate") > 0))
    return Error{"task 'throughput' parameter 'rate': poisson arrivals need a rate above 0 requests per second"};
  return std::unique_ptr<Task>(std::make_unique<ThroughputTask>(params));
}

}  // namespace inferlab::tasks
