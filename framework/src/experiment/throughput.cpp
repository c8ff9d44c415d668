#include "experiment/throughput.h"

#include <fmt/format.h>
#include <fmt/ranges.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <map>
#include <nlohmann/json.hpp>

#include "engine/batch_scheduler.h"

namespace inferlab {
namespace {

using Clock = std::chrono::steady_clock;

// The pages one request holds after each length, from the first request run
// alone: index t - prompt for t = prompt .. prompt + new - 1.
Result<std::vector<int64_t>> footprint(Engine& engine, const TaskSample& sample) {
  std::vector<int64_t> pages;
  auto seq = engine.new_sequence();
  int32_t next = 0;
  const LogitsSink sink = [&](int64_t, std::span<const float> l) { next = argmax(l); };
  const int64_t n = int64_t(sample.prompt_tokens.size());
  if (auto s = engine.forward(*seq, sample.prompt_tokens, n - 1, sink); !s) return s.error();
  pages.push_back(seq->pages_held());
  for (int32_t i = 1; i < sample.max_new_tokens; ++i) {
    if (auto s = engine.forward(*seq, std::vector<int32_t>{next}, 0, sink); !s) return s.error();
    pages.push_back(seq->pages_held());
  }
  for (size_t i = 1; i < pages.size(); ++i) pages[i] = std::max(pages[i], pages[i - 1]);  // never less later
  return pages;
}

struct Request {
  const TaskSample* sample = nullptr;
  double arrival = 0, first_token = -1, finish = -1;
  std::unique_ptr<KvSequence> seq;
  std::vector<int32_t> generated;
  std::vector<int32_t> fed;  // what this step feeds it
  int64_t preempted = 0;
};

}  // namespace

Result<RunMeasurements> measure_throughput(MeasureContext& ctx) {
  Engine& engine = *ctx.engine;
  const auto& samples = *ctx.samples;
  if (samples.empty()) return Error{"throughput: no requests"};
  if (ctx.batch < 1) return Error{fmt::format("experiment.batch: {} sequences per step (at least 1)", ctx.batch)};
  if (ctx.method != nullptr && ctx.method->speculation().active())
    return Error{fmt::format("throughput: plugin {} speculates, and the batch scheduler decodes one token per "
                             "sequence and step (measure it with a generation task)",
                             ctx.method_name)};
  if (ctx.method != nullptr) ctx.method->begin_sequence(engine.shape());

  auto curve = footprint(engine, samples.front());
  if (!curve) return Error{fmt::format("throughput: request 0 alone: {}", curve.message())};
  const int64_t prompt = int64_t(samples.front().prompt_tokens.size());
  const int64_t page_bytes = engine.pool().page_bytes();
  const int64_t dense_per_token_page = int64_t(engine.config().n_layers) * engine.config().n_kv_heads;
  const int64_t ps = engine.options().page_size;
  const BatchScheduler::PagesFor pages_for = [c = *curve, prompt, dense_per_token_page, ps](int64_t tokens) {
    if (tokens < prompt) return dense_per_token_page * ((tokens + ps - 1) / ps);
    return c[size_t(std::min<int64_t>(tokens - prompt, int64_t(c.size()) - 1))];
  };
  const double budget_mb = ctx.task_params->get_float("kv_budget_mb");
  const int64_t longest = prompt + samples.front().max_new_tokens - 1;
  const int64_t budget = budget_mb > 0 ? int64_t(std::floor(budget_mb * 1048576.0 / double(page_bytes)))
                                       : ctx.batch * pages_for(longest);
  const auto budget_error = [&](const std::string& why) {
    return Error{fmt::format("task 'throughput' parameter 'kv_budget_mb' ({} MiB = {} pages of {} bytes; a request "
                             "holds {} at its longest): {}",
                             budget_mb, budget, page_bytes, pages_for(longest), why)};
  };
  auto scheduler = BatchScheduler::create(budget, int32_t(ctx.batch), pages_for);
  if (!scheduler) return budget_error(scheduler.message());

  std::vector<Request> requests(samples.size());
  for (size_t i = 0; i < samples.size(); ++i) {
    requests[i].sample = &samples[i];
    const auto tag = samples[i].tags.find("arrival_s");
    requests[i].arrival = tag != samples[i].tags.end() ? tag->second : 0.0;
    if (int64_t(samples[i].prompt_tokens.size()) != prompt || samples[i].max_new_tokens != samples.front().max_new_tokens)
      return Error{fmt::format("throughput: request {} differs in length from request 0", i)};
  }
  engine.reset_counters();
  double now = 0, busy = 0;
  size_t arrived = 0;
  int64_t steps = 0, batch_sum = 0, batch_max = 0, pages_peak = 0, overruns = 0;
  double pages_sum = 0;
  while (true) {
    for (; arrived < requests.size() && requests[arrived].arrival <= now; ++arrived) {
      const TaskSample& s = *requests[arrived].sample;
      if (auto st = scheduler->add({int64_t(arrived), int64_t(s.prompt_tokens.size()), s.max_new_tokens}); !st)
        return budget_error(st.message());
    }
    if (scheduler->idle()) {
      if (arrived == requests.size()) break;
      now = std::max(now, requests[arrived].arrival);  // nothing to run until the next request arrives
      continue;
    }
    const BatchStep step = scheduler->next_step();
    if (step.run.empty()) return Error{"throughput: the scheduler ran nothing while requests were waiting"};
    for (const int64_t id : step.preempted) {
      requests[size_t(id)].seq.reset();  // recomputation: its KV goes, its tokens stay
      ++requests[size_t(id)].preempted;
    }
    std::vector<Engine::BatchItem> items;
    std::vector<int32_t> next(step.run.size(), -1);
    for (size_t k = 0; k < step.run.size(); ++k) {
      Request& r = requests[size_t(step.run[k].id)];
      if (step.run[k].prefill) {
        r.seq = engine.new_sequence();
        r.fed = r.sample->prompt_tokens;
        r.fed.insert(r.fed.end(), r.generated.begin(), r.generated.end());
      } else {
        r.fed = {r.generated.back()};
      }
      if (int64_t(r.fed.size()) != step.run[k].tokens)
        return Error{fmt::format("throughput: request {} feeds {} tokens, the scheduler planned {}", step.run[k].id,
                                 r.fed.size(), step.run[k].tokens)};
      int32_t* out = &next[k];
      items.push_back({r.seq.get(), r.fed, int64_t(r.fed.size()) - 1,
                       [out](int64_t, std::span<const float> l) { *out = argmax(l); }});
    }
    const auto t0 = Clock::now();
    if (auto s = engine.forward_batch(items); !s) return Error{fmt::format("throughput step {}: {}", steps, s.message())};
    const double dt = std::chrono::duration<double>(Clock::now() - t0).count();
    now += dt;
    busy += dt;
    ++steps;
    batch_sum += int64_t(step.run.size());
    batch_max = std::max<int64_t>(batch_max, int64_t(step.run.size()));
    for (size_t k = 0; k < step.run.size(); ++k) {
      Request& r = requests[size_t(step.run[k].id)];
      r.generated.push_back(next[k]);
      if (r.first_token < 0) r.first_token = now;
      if (int32_t(r.generated.size()) >= r.sample->max_new_tokens) {
        r.finish = now;
        r.seq.reset();
      }
    }
    scheduler->complete(step);
    int64_t held = 0;
    for (const Request& r : requests)
      if (r.seq) held += r.seq->pages_held();
    pages_peak = std::max(pages_peak, held);
    pages_sum += double(held);
    if (held > budget) ++overruns;
  }

  RunMeasurements out;
  std::vector<double> ttft, tpot, latency;
  int64_t output_tokens = 0, preemptions = 0;
  double first_arrival = requests.front().arrival, last_finish = 0;
  for (size_t i = 0; i < requests.size(); ++i) {
    const Request& r = requests[i];
    const int64_t n = int64_t(r.generated.size());
    output_tokens += n;
    preemptions += r.preempted;
    first_arrival = std::min(first_arrival, r.arrival);
    last_finish = std::max(last_finish, r.finish);
    ttft.push_back(r.first_token - r.arrival);
    if (n > 1) tpot.push_back((r.finish - r.first_token) / double(n - 1));
    latency.push_back(r.finish - r.arrival);
    SampleRow row;
    row.index = int64_t(i);
    row.input_tokens = int64_t(r.sample->prompt_tokens.size());
    row.latency_seconds = r.finish - r.arrival;
    row.produced = fmt::format("{}", fmt::join(r.generated, " "));  // token ids: the greedy output
    row.detail_json = nlohmann::json{{"arrival_s", r.arrival},
                                     {"ttft_s", r.first_token - r.arrival},
                                     {"tpot_s", n > 1 ? (r.finish - r.first_token) / double(n - 1) : 0.0},
                                     {"output_tokens", n},
                                     {"preemptions", r.preempted}}
                          .dump();
    out.samples.push_back(std::move(row));
  }
  const double span = std::max(last_finish - first_arrival, 1e-12);
  auto& m = out.metrics;
  m.push_back({"samples", double(requests.size()), "count"});
  m.push_back({"batch", double(ctx.batch), "sequences"});
  m.push_back({"output_tokens", double(output_tokens), "tokens"});
  m.push_back({"duration_s", span, "s"});
  m.push_back({"busy_fraction", busy / span, "fraction"});
  m.push_back({"output_tokens_per_s", double(output_tokens) / span, "tokens/s"});
  m.push_back({"requests_per_s", double(requests.size()) / span, "requests/s"});
  for (const auto& [name, values] : {std::pair{"ttft", &ttft}, std::pair{"tpot", &tpot}, std::pair{"latency", &latency}})
    for (const auto& [tag, p] : {std::pair{"p50", 0.50}, std::pair{"p90", 0.90}, std::pair{"p99", 0.99}})
      if (!values->empty()) m.push_back({fmt::format("{}_{}_ms", name, tag), percentile(*values, p) * 1e3, "ms"});
  m.push_back({"kv_pages_budget", double(budget), "pages"});
  m.push_back({"kv_pages_peak", double(pages_peak), "pages"});
  m.push_back({"kv_pages_mean", pages_sum / double(std::max<int64_t>(steps, 1)), "pages"});
  m.push_back({"kv_bytes_peak", double(pages_peak * page_bytes), "bytes"});
  m.push_back({"kv_pages_per_request", double(pages_for(longest)), "pages"});
  m.push_back({"kv_budget_overruns", double(overruns), "steps"});
  m.push_back({"preemptions", double(preemptions), "count"});
  m.push_back({"steps", double(steps), "count"});
  m.push_back({"batch_mean", double(batch_sum) / double(std::max<int64_t>(steps, 1)), "sequences"});
  m.push_back({"batch_max", double(batch_max), "sequences"});
  for (const auto& [name, value] : engine.counters().as_map()) m.push_back({"engine." + name, value, "count"});
  if (ctx.method != nullptr)
    for (const auto& [name, value] : ctx.method->counters()) m.push_back({"plugin." + name, value, ""});
  return out;
}

}  // namespace inferlab
