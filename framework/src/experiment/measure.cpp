#include "experiment/measure.h"
#include "experiment/throughput.h"

#include "engine/generation.h"

#include <fmt/format.h>
#include <sys/resource.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <nlohmann/json.hpp>
#include <numeric>

namespace inferlab {

namespace {

using Clock = std::chrono::steady_clock;
double since(Clock::time_point t0) { return std::chrono::duration<double>(Clock::now() - t0).count(); }

// Everything measured over a run's samples, before it becomes metrics.
struct Tally {
  int64_t samples = 0;
  double score_sum = 0;
  int64_t scored = 0;
  std::vector<double> ttft, tpot;  // seconds
  double prefill_seconds = 0, decode_seconds = 0;
  int64_t prefill_tokens = 0, decode_tokens = 0;
  double nll_sum = 0;
  int64_t nll_count = 0;
  int64_t fidelity_positions = 0, fidelity_agree = 0;
  double kl_sum = 0;
  int64_t kl_count = 0;
  int64_t kv_peak = 0;
  double kv_final_sum = 0;
};

// One sequence under the context's method: prefill in chunks, then decode.
class SampleRunner {
 public:
  SampleRunner(MeasureContext& ctx, Tally& tally) : ctx_(ctx), tally_(tally), engine_(*ctx.engine) {}

  // Prefills `prompt`; `sink` sees the logits of rows logits_from.. (row = index in prompt).
  Status prefill(std::span<const int32_t> prompt, int64_t chunk, const LogitsSink& sink, int64_t logits_from = 0) {
    if (ctx_.method != nullptr) ctx_.method->begin_sequence(engine_.shape());
    seq_ = engine_.new_sequence();
    engine_.pool().reset_peak();
    const int64_t n = int64_t(prompt.size());
    if (chunk <= 0) chunk = n;
    const auto t0 = Clock::now();
    for (int64_t start = 0; start < n; start += chunk) {
      const int64_t len = std::min(chunk, n - start);
      const int64_t from = std::clamp<int64_t>(logits_from - start, 0, len);
      auto s = engine_.forward(*seq_, prompt.subspan(size_t(start), size_t(len)), from,
                               [&](int64_t row, std::span<const float> l) { sink(start + row, l); });
      if (!s) return s;
    }
    tally_.prefill_seconds += since(t0);
    tally_.prefill_tokens += n;
    return ok_status();
  }

  // One prompt token fed as a decode step (a question under question = "decode"):
  // counted as prompt processing, not as a generated token.
  Status feed(int32_t token, const std::function<void(std::span<const float>)>& sink) {
    const auto t0 = Clock::now();
    auto s = engine_.forward(*seq_, std::span<const int32_t>(&token, 1), 0,
                             [&](int64_t, std::span<const float> l) { sink(l); });
    tally_.prefill_seconds += since(t0);
    ++tally_.prefill_tokens;
    return s;
  }

  // One decode step; `sink` sees its logits. Adds the step to TPOT.
  Status decode(int32_t token, const std::function<void(std::span<const float>)>& sink) {
    const auto t0 = Clock::now();
    auto s = engine_.forward(*seq_, std::span<const int32_t>(&token, 1), 0,
                             [&](int64_t, std::span<const float> l) { sink(l); });
    const double dt = since(t0);
    tally_.tpot.push_back(dt);
    tally_.decode_seconds += dt;
    ++tally_.decode_tokens;
    return s;
  }

  // Self-speculation, when the method speculates: each speculation's time
  // (and the time its rejected drafts take to leave) goes to decoding, spread
  // evenly over the tokens chosen from its rows.
  void speculate_into(TokenLoop& loop) {
    speculate_with(loop, engine_, *seq_);
    if (!loop.speculate) return;
    auto speculate = loop.speculate;
    auto drop = loop.drop;
    loop.speculate = [this, speculate](int32_t token, int32_t max_drafts, std::vector<int32_t>& drafts,
                                       std::vector<float>& rows) {
      const auto t0 = Clock::now();
      auto s = speculate(token, max_drafts, drafts, rows);
      speculation_seconds_ = since(t0);
      return s;
    };
    loop.drop = [this, drop](int32_t count, bool rejected) {
      const auto t0 = Clock::now();
      auto s = drop(count, rejected);
      speculation_seconds_ += since(t0);
      return s;
    };
    loop.on_speculated = [this](int32_t used) {
      for (int32_t i = 0; i < used; ++i) tally_.tpot.push_back(speculation_seconds_ / used);
      tally_.decode_seconds += speculation_seconds_;
      tally_.decode_tokens += used;
    };
  }

  // Starts from a saved dense prefill instead of computing it.
  void start_from(const PrefillSnapshot& snapshot, int64_t prompt_tokens) {
    if (ctx_.method != nullptr) ctx_.method->begin_sequence(engine_.shape());
    seq_ = snapshot.seq->clone(engine_.shared_pool());
    engine_.pool().reset_peak();
    tally_.prefill_seconds += snapshot.seconds;
    tally_.prefill_tokens += prompt_tokens;
  }

  // Saves the current sequence (right after a dense prefill) for reuse.
  void save(PrefillCache& cache, const std::string& key, const std::vector<float>& last, double seconds) {
    if (cache.snapshots.count(key) != 0) return;
    if (!cache.pool) cache.pool = engine_.pool().sibling();
    if (cache.pool->bytes_in_use() + seq_->pages_held() * cache.pool->page_bytes() > cache.max_bytes) return;
    cache.snapshots[key] = PrefillSnapshot{seq_->clone(cache.pool), last, seconds};
  }

  bool context_full() const { return seq_->n_past() >= engine_.max_context(); }

  void finish() {
    tally_.kv_peak = std::max(tally_.kv_peak, engine_.pool().peak_bytes_in_use());
    tally_.kv_final_sum += double(seq_->pages_held() * engine_.pool().page_bytes());
    seq_.reset();
  }

 private:
  MeasureContext& ctx_;
  Tally& tally_;
  Engine& engine_;
  std::unique_ptr<KvSequence> seq_;
  double speculation_seconds_ = 0;  // the current speculation's
};

// The context's method on its engine (dense when there is none).
Status install_method(MeasureContext& ctx) {
  return ctx.engine->set_method(ctx.method, ctx.hooks, ctx.overrides,
                                ctx.method_name.empty() ? std::string("method") : ctx.method_name);
}

std::string sample_key(const MeasureContext& ctx, size_t index) { return fmt::format("{}#{}", ctx.task_key, index); }

bool reuses_prefill(const MeasureContext& ctx) {
  return ctx.prefills != nullptr && ctx.method != nullptr && ctx.method->dense_prefill();
}

struct FirstLogits {
  std::vector<float> logits;  // of the prompt's last token
  double reused_seconds = 0;  // > 0: the prefill came from a snapshot that took this long
};

// How a sample starts: which saved prefills it may use, and whether its question is fed.
struct StartOptions {
  bool reuse_dense_own = false;  // the dense run itself may start from its saved prefill
  bool feed_question = true;     // false: stop after the context (saving snapshots only)
};

// Prefills a sample's prompt, or starts from its saved dense prefill when the
// method's prefill is dense. Dense runs save their prefill for later methods.
// Under question = "decode" only the context is prefilled (and saved); the
// question's tokens then go through the method one decode step each.
Result<FirstLogits> start_sample(MeasureContext& ctx, SampleRunner& runner, size_t index,
                                 StartOptions options = {}) {
  const TaskSample& sample = (*ctx.samples)[index];
  const std::span<const int32_t> prompt(sample.prompt_tokens);
  const int64_t n = int64_t(prompt.size());
  const int64_t question = std::clamp<int64_t>(sample.question_tokens, 0, n - 1);
  const int64_t context = n - question;
  const std::string key = sample_key(ctx, index);
  FirstLogits first;
  const bool reuse = reuses_prefill(ctx) || (options.reuse_dense_own && ctx.method == nullptr && ctx.prefills);
  const PrefillSnapshot* saved = nullptr;
  if (reuse)
    if (auto it = ctx.prefills->snapshots.find(key); it != ctx.prefills->snapshots.end()) saved = &it->second;
  if (saved != nullptr) {
    runner.start_from(*saved, context);
    first = FirstLogits{saved->last_logits, saved->seconds};
  } else {
    const auto t0 = Clock::now();
    auto s = runner.prefill(
        prompt.first(size_t(context)), ctx.prefill_chunk,
        [&](int64_t row, std::span<const float> l) {
          if (row == context - 1) first.logits.assign(l.begin(), l.end());
        },
        context - 1);
    if (!s) return s.error();
    if (ctx.prefills != nullptr && ctx.method == nullptr) runner.save(*ctx.prefills, key, first.logits, since(t0));
  }
  if (!options.feed_question) return first;
  for (int64_t i = context; i < n; ++i)
    if (auto s = runner.feed(prompt[size_t(i)], [&](std::span<const float> l) { first.logits.assign(l.begin(), l.end()); });
        !s)
      return s.error();
  return first;
}

struct Generated {
  std::vector<int32_t> tokens;
  double ttft = 0, seconds = 0;
};

// Greedy generation of up to max_new tokens, stopping at EOS.
Result<Generated> generate_greedy(MeasureContext& ctx, Tally& tally, size_t index, std::vector<float>* logits_out) {
  const TaskSample& sample = (*ctx.samples)[index];
  SampleRunner runner(ctx, tally);
  Generated out;
  const auto t0 = Clock::now();
  auto first = start_sample(ctx, runner, index);
  if (!first) return first.error();
  out.ttft = first->reused_seconds > 0 ? first->reused_seconds + since(t0) : since(t0);
  TokenLoop loop;  // greedy, the loop `inferlab generate` runs
  loop.choose = argmax;
  loop.decode = [&](int32_t token, std::vector<float>& logits) {
    return runner.decode(token, [&](std::span<const float> l) { logits.assign(l.begin(), l.end()); });
  };
  loop.context_full = [&] { return runner.context_full(); };
  runner.speculate_into(loop);
  if (logits_out != nullptr)
    loop.on_token = [&](int32_t, std::span<const float> l) { logits_out->insert(logits_out->end(), l.begin(), l.end()); };
  auto tokens = run_token_loop(std::move(first->logits), sample.max_new_tokens,
                               ctx.engine->model().tokenizer().eos(), loop);
  if (!tokens) return tokens.error();
  out.tokens = std::move(tokens->tokens);
  out.seconds = since(t0);
  runner.finish();
  return out;
}

// Dense's greedy output for a sample: from the cache, or computed now with the
// method switched off.
Result<const DenseReference*> dense_reference(MeasureContext& ctx, size_t index, bool with_logits) {
  const std::string key = sample_key(ctx, index);
  if (auto it = ctx.dense->find(key); it != ctx.dense->end()) return &it->second;
  MeasureContext dense = ctx;
  dense.method = nullptr;
  (void)ctx.engine->set_method(nullptr, 0);
  Tally scratch;
  DenseReference ref;
  auto gen = generate_greedy(dense, scratch, index, with_logits ? &ref.logits : nullptr);
  if (auto s = install_method(ctx); !s) return s.error();
  if (!gen) return gen.error();
  ref.tokens = gen->tokens;
  DenseReference& stored = (*ctx.dense)[key];
  stored = std::move(ref);
  return &stored;
}

// Dense prefills of every sample not saved yet, with the method switched off.
Status ensure_snapshots(MeasureContext& ctx) {
  MeasureContext dense = ctx;
  dense.method = nullptr;
  (void)ctx.engine->set_method(nullptr, 0);
  for (size_t i = 0; i < ctx.samples->size(); ++i) {
    if (ctx.prefills->snapshots.count(sample_key(ctx, i)) != 0) continue;
    Tally scratch;
    SampleRunner runner(dense, scratch);
    auto first = start_sample(dense, runner, i, StartOptions{.feed_question = false});
    if (!first) return first.error();
  }
  return install_method(ctx);
}

Result<SampleRow> generation_sample(MeasureContext& ctx, Tally& tally, size_t index) {
  const TaskSample& sample = (*ctx.samples)[index];
  auto gen = generate_greedy(ctx, tally, index, nullptr);
  if (!gen) return gen.error();
  const std::string text = ctx.engine->model().tokenizer().decode(gen->tokens);
  const double score = ctx.task->score(sample, text);
  tally.score_sum += score;
  ++tally.scored;
  tally.ttft.push_back(gen->ttft);
  if (ctx.method == nullptr) {
    (*ctx.dense)[sample_key(ctx, index)].tokens = gen->tokens;
  } else {
    auto ref = dense_reference(ctx, index, false);
    if (!ref) return ref.error();
    const auto& d = (*ref)->tokens;
    const size_t common = std::min(d.size(), gen->tokens.size());
    for (size_t i = 0; i < common; ++i) tally.fidelity_agree += d[i] == gen->tokens[i];
    tally.fidelity_positions += int64_t(std::max(d.size(), gen->tokens.size()));
  }
  std::string expected;
  for (const auto& e : sample.expected) expected += (expected.empty() ? "" : " | ") + e;
  nlohmann::json detail = {{"id", sample.id}, {"score", score}, {"ttft_ms", gen->ttft * 1e3},
                           {"generated_tokens", gen->tokens.size()}};
  for (const auto& [k, v] : sample.tags) detail[k] = v;
  return SampleRow{int64_t(index), int64_t(sample.prompt_tokens.size()), expected, text, score >= 1.0,
                   gen->seconds, detail.dump()};
}

Result<SampleRow> perplexity_sample(MeasureContext& ctx, Tally& tally, size_t index) {
  const TaskSample& sample = (*ctx.samples)[index];
  const auto& tokens = sample.prompt_tokens;
  const int64_t chunk = ctx.task_params->has("chunk") ? ctx.task_params->get_int("chunk") : 0;
  SampleRunner runner(ctx, tally);
  const auto t0 = Clock::now();
  // One window over the whole sample, scored as `inferlab perplexity` scores its windows.
  auto scored = score_window(tokens, PerplexityWindow{0, int64_t(tokens.size()), 1},
                             [&](std::span<const int32_t> window, int64_t logits_from, const LogitsSink& sink) {
                               return runner.prefill(window, chunk, sink, logits_from);
                             });
  if (!scored) return scored.error();
  const double nll = scored->nll;
  const int64_t count = scored->count;
  const double seconds = since(t0);
  runner.finish();
  tally.nll_sum += nll;
  tally.nll_count += count;
  nlohmann::json detail = {{"id", sample.id}, {"nll_mean", count > 0 ? nll / double(count) : 0.0},
                           {"perplexity", count > 0 ? std::exp(nll / double(count)) : 0.0},
                           {"nll_sum", nll}, {"scored", count}};
  return SampleRow{int64_t(index), int64_t(tokens.size()), "", "", std::nullopt, seconds, detail.dump()};
}

// A fidelity sample's comparison with dense, added to the tally: `agree` of
// `positions` tokens the same, `kl` summed over `kl_rows` rows. Its detail row.
nlohmann::json tally_fidelity(Tally& tally, const TaskSample& sample, int64_t agree, int64_t positions, double kl,
                              int64_t kl_rows) {
  tally.fidelity_agree += agree;
  tally.fidelity_positions += positions;
  tally.kl_sum += kl;
  tally.kl_count += kl_rows;
  return {{"id", sample.id},
          {"top1_agreement", positions > 0 ? double(agree) / double(positions) : 1.0},
          {"kl_mean", kl_rows > 0 ? kl / double(kl_rows) : 0.0}};
}

// A speculating method's fidelity: teacher forcing would only run its verifying
// model one token at a time, so it generates freely (speculating) and its
// tokens are compared with dense's position by position; the KL is taken over
// the rows both chose from the same text (up to the first difference).
Result<SampleRow> speculative_fidelity_sample(MeasureContext& ctx, Tally& tally, size_t index,
                                              const DenseReference& d) {
  const TaskSample& sample = (*ctx.samples)[index];
  const size_t v = size_t(ctx.engine->config().n_vocab);
  std::vector<float> rows;
  auto gen = generate_greedy(ctx, tally, index, &rows);
  if (!gen) return gen.error();
  tally.ttft.push_back(gen->ttft);
  const size_t common = std::min(d.tokens.size(), gen->tokens.size());
  int64_t agree = 0, compared = 0;
  double kl = 0;
  bool same_text = true;
  for (size_t k = 0; k < common; ++k) {
    agree += d.tokens[k] == gen->tokens[k];
    if (!same_text) continue;
    const auto lp = log_softmax(std::span<const float>(d.logits.data() + k * v, v));
    const auto lq = log_softmax(std::span<const float>(rows.data() + k * v, v));
    for (size_t i = 0; i < v; ++i) kl += std::exp(lp[i]) * (lp[i] - lq[i]);
    ++compared;
    same_text = d.tokens[k] == gen->tokens[k];
  }
  const int64_t positions = int64_t(std::max(d.tokens.size(), gen->tokens.size()));
  nlohmann::json detail = tally_fidelity(tally, sample, agree, positions, kl, compared);
  detail["generated_tokens"] = gen->tokens.size();
  return SampleRow{int64_t(index), int64_t(sample.prompt_tokens.size()), "", "", std::nullopt, gen->seconds,
                   detail.dump()};
}

// Teacher-forced comparison with dense over dense's generated tokens.
Result<SampleRow> fidelity_sample(MeasureContext& ctx, Tally& tally, size_t index) {
  const TaskSample& sample = (*ctx.samples)[index];
  auto ref = dense_reference(ctx, index, true);
  if (!ref) return ref.error();
  const DenseReference& d = **ref;
  if (ctx.method != nullptr && ctx.engine->speculation().active())
    return speculative_fidelity_sample(ctx, tally, index, d);
  const size_t v = size_t(ctx.engine->config().n_vocab);
  SampleRunner runner(ctx, tally);
  const auto t0 = Clock::now();
  const int64_t n = int64_t(sample.prompt_tokens.size());
  auto first = start_sample(ctx, runner, index);
  if (!first) return first.error();
  std::vector<float> last = std::move(first->logits);
  tally.ttft.push_back(first->reused_seconds + since(t0));
  Status s = ok_status();
  int64_t agree = 0;
  double kl = 0;
  for (size_t k = 0; k < d.tokens.size(); ++k) {
    const std::span<const float> dense_row(d.logits.data() + k * v, v);
    agree += argmax(last) == argmax(dense_row);
    const auto lp = log_softmax(dense_row), lq = log_softmax(last);
    for (size_t i = 0; i < v; ++i) kl += std::exp(lp[i]) * (lp[i] - lq[i]);
    if (k + 1 == d.tokens.size()) break;
    s = runner.decode(d.tokens[k], [&](std::span<const float> l) { last.assign(l.begin(), l.end()); });
    if (!s) return s.error();
  }
  runner.finish();
  const int64_t positions = int64_t(d.tokens.size());
  const nlohmann::json detail = tally_fidelity(tally, sample, agree, positions, kl, positions);
  return SampleRow{int64_t(index), n, "", "", std::nullopt, since(t0), detail.dump()};
}

// The teacher-forced answer of every sample that has one: its log-probability
// under the method and how many of its digit tokens are the method's top-1.
// Runs after the run's other metrics are taken, so its steps count nowhere else.
struct AnswerTally {
  double logprob_sum = 0;
  int64_t samples = 0, digits = 0, digits_right = 0;
};

bool has_digit(const std::string& s) {
  return std::any_of(s.begin(), s.end(), [](char c) { return c >= '0' && c <= '9'; });
}

Status score_answers(MeasureContext& ctx, RunMeasurements& out, AnswerTally& answers) {
  const Tokenizer& tok = ctx.engine->model().tokenizer();
  for (size_t i = 0; i < ctx.samples->size(); ++i) {
    const TaskSample& sample = (*ctx.samples)[i];
    if (sample.answer.empty()) continue;
    const std::vector<int32_t> answer = tok.encode(sample.answer, false, /*parse_special=*/false);
    if (answer.empty()) continue;
    Tally scratch;
    SampleRunner runner(ctx, scratch);
    auto first = start_sample(ctx, runner, i, StartOptions{.reuse_dense_own = true});
    if (!first) return Error{fmt::format("sample {} ({}) answer: {}", i, sample.id, first.message())};
    std::vector<float> logits = std::move(first->logits);
    double logprob = 0;
    int64_t digits = 0, right = 0;
    for (size_t k = 0; k < answer.size(); ++k) {
      logprob += log_softmax(logits)[size_t(answer[k])];
      if (has_digit(tok.decode({answer[k]}))) {
        ++digits;
        right += argmax(logits) == answer[k];
      }
      if (k + 1 == answer.size()) break;
      auto s = runner.decode(answer[k], [&](std::span<const float> l) { logits.assign(l.begin(), l.end()); });
      if (!s) return Error{fmt::format("sample {} ({}) answer: {}", i, sample.id, s.message())};
    }
    runner.finish();
    answers.logprob_sum += logprob;
    ++answers.samples;
    answers.digits += digits;
    answers.digits_right += right;
    auto detail = nlohmann::json::parse(out.samples[i].detail_json, nullptr, false);
    if (detail.is_object()) {
      detail["answer_logprob"] = logprob;
      detail["answer_tokens"] = answer.size();
      if (digits > 0) detail["answer_digits"] = digits, detail["answer_digits_right"] = right;
      out.samples[i].detail_json = detail.dump();
    }
  }
  if (answers.samples > 0)
    out.metrics.push_back({"answer_logprob", answers.logprob_sum / double(answers.samples), "nats"});
  if (answers.digits > 0)
    out.metrics.push_back({"answer_digit_accuracy", double(answers.digits_right) / double(answers.digits), "fraction"});
  return ok_status();
}


double mean(const std::vector<double>& v) {
  return v.empty() ? 0.0 : std::accumulate(v.begin(), v.end(), 0.0) / double(v.size());
}

int64_t peak_rss_bytes() {
  rusage usage{};
  getrusage(RUSAGE_SELF, &usage);
  return int64_t(usage.ru_maxrss) * 1024;
}

std::vector<MetricValue> tally_metrics(const MeasureContext& ctx, const Tally& t) {
  std::vector<MetricValue> m;
  m.push_back({"samples", double(t.samples), "count"});
  if (t.scored > 0) m.push_back({"accuracy", t.score_sum / double(t.scored), "fraction"});
  if (t.nll_count > 0) m.push_back({"perplexity", std::exp(t.nll_sum / double(t.nll_count)), "ppl"});
  if (t.fidelity_positions > 0)
    m.push_back({"fidelity_top1", double(t.fidelity_agree) / double(t.fidelity_positions), "fraction"});
  if (t.kl_count > 0) m.push_back({"fidelity_kl", t.kl_sum / double(t.kl_count), "nats"});
  if (!t.ttft.empty()) m.push_back({"ttft_ms", mean(t.ttft) * 1e3, "ms"});
  if (!t.tpot.empty()) {
    m.push_back({"tpot_mean_ms", mean(t.tpot) * 1e3, "ms"});
    m.push_back({"tpot_p50_ms", percentile(t.tpot, 0.50) * 1e3, "ms"});
    m.push_back({"tpot_p99_ms", percentile(t.tpot, 0.99) * 1e3, "ms"});
    m.push_back({"decode_tokens_per_s", double(t.decode_tokens) / t.decode_seconds, "tokens/s"});
  }
  if (t.prefill_seconds > 0) {
    m.push_back({"prefill_tokens_per_s", double(t.prefill_tokens) / t.prefill_seconds, "tokens/s"});
    m.push_back({"prefill_ms", t.prefill_seconds * 1e3 / double(std::max<int64_t>(1, t.samples)), "ms"});
  }
  m.push_back({"kv_bytes_peak", double(t.kv_peak), "bytes"});
  m.push_back({"kv_bytes_final", t.kv_final_sum / double(std::max<int64_t>(1, t.samples)), "bytes"});
  m.push_back({"peak_rss_bytes", double(peak_rss_bytes()), "bytes"});
  if (const auto stored = ctx.engine->stored_weights(); stored.values > 0) {  // 4-bit weights (QLoRA)
    m.push_back({"weights_stored_bytes", double(stored.bytes), "bytes"});
    m.push_back({"weights_stored_bits_per_param", 8.0 * double(stored.bytes) / double(stored.values), "bits"});
  }
  const EngineCounters& counters = ctx.engine->counters();
  const int64_t heads = int64_t(ctx.engine->config().n_layers) * ctx.engine->config().n_kv_heads;
  if (counters.decode_steps > 0 && heads > 0)  // the budget a method actually ran at, beside its nominal one
    m.push_back({"keys_read_per_step", double(counters.decode_keys_read) / double(counters.decode_steps * heads),
                 "keys"});
  if (counters.sparse_prefill_keys_causal > 0)  // a sparse prefill's achieved density, over its sparse heads
    m.push_back({"sparse_prefill_keys_share",
                 double(counters.sparse_prefill_keys_read) / double(counters.sparse_prefill_keys_causal), "fraction"});
  for (const auto& [name, value] : counters.as_map()) m.push_back({"engine." + name, value, "count"});
  if (ctx.method != nullptr)
    for (const auto& [name, value] : ctx.method->counters()) m.push_back({"plugin." + name, value, ""});
  return m;
}

}  // namespace

std::vector<double> log_softmax(std::span<const float> logits) {
  const double mx = double(*std::max_element(logits.begin(), logits.end()));
  double sum = 0;
  for (float l : logits) sum += std::exp(double(l) - mx);
  const double log_sum = std::log(sum) + mx;
  std::vector<double> out(logits.size());
  for (size_t i = 0; i < logits.size(); ++i) out[i] = double(logits[i]) - log_sum;
  return out;
}

int32_t argmax(std::span<const float> logits) {
  return int32_t(std::max_element(logits.begin(), logits.end()) - logits.begin());
}

double percentile(std::vector<double> v, double p) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  const double rank = p * double(v.size() - 1);
  const size_t lo = size_t(std::floor(rank)), hi = size_t(std::ceil(rank));
  return v[lo] + (v[hi] - v[lo]) * (rank - double(lo));
}

Result<RunMeasurements> measure_run(MeasureContext& ctx) {
  // A backend without what the method needs refuses it here, before any token.
  if (auto s = install_method(ctx); !s) return s.error();
  const MethodScope installed(*ctx.engine);  // dense again on every way out
  // Dense references first, so the run's counters and timings are its own.
  const TaskKind kind = ctx.task->kind();
  if (kind == TaskKind::Throughput) return measure_throughput(ctx);
  if (ctx.batch != 1)
    return Error{fmt::format("a batch of {} serves throughput tasks only, not '{}'", ctx.batch, ctx.task->name())};
  if (kind == TaskKind::Fidelity || (kind == TaskKind::Generation && ctx.method != nullptr))
    for (size_t i = 0; i < ctx.samples->size(); ++i)
      if (auto ref = dense_reference(ctx, i, kind == TaskKind::Fidelity); !ref)
        return Error{fmt::format("dense reference of sample {}: {}", i, ref.message())};
  if (reuses_prefill(ctx) && kind != TaskKind::Perplexity)
    if (auto s = ensure_snapshots(ctx); !s) return s.error();
  ctx.engine->reset_counters();
  Tally tally;
  RunMeasurements out;
  for (size_t i = 0; i < ctx.samples->size(); ++i) {
    Result<SampleRow> row = Error{""};
    switch (kind) {
      case TaskKind::Generation: row = generation_sample(ctx, tally, i); break;
      case TaskKind::Perplexity: row = perplexity_sample(ctx, tally, i); break;
      case TaskKind::Fidelity: row = fidelity_sample(ctx, tally, i); break;
      case TaskKind::Throughput: break;  // measure_throughput, above
    }
    if (!row) return Error{fmt::format("sample {} ({}): {}", i, (*ctx.samples)[i].id, row.message())};
    out.samples.push_back(std::move(*row));
    ++tally.samples;
    if (ctx.on_sample) ctx.on_sample(int64_t(i + 1));
  }
  out.metrics = tally_metrics(ctx, tally);
  if (kind == TaskKind::Generation) {
    AnswerTally answers;
    if (auto s = score_answers(ctx, out, answers); !s) return s.error();
  }
  return out;
}

}  // namespace inferlab
