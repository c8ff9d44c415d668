#include "engine/generation.h"

#include <fmt/format.h>

#include <algorithm>
#include <chrono>
#include <cmath>

namespace inferlab {

namespace {
using Clock = std::chrono::steady_clock;
double seconds_since(Clock::time_point t0) { return std::chrono::duration<double>(Clock::now() - t0).count(); }
}  // namespace

// Log-softmax of logits at index `target`, computed in double for stability.
double log_prob(std::span<const float> logits, int32_t target) {
  const float max_logit = *std::max_element(logits.begin(), logits.end());
  double sum = 0.0;
  for (float l : logits) sum += std::exp(double(l) - double(max_logit));
  return double(logits[size_t(target)]) - double(max_logit) - std::log(sum);
}

Result<TokenLoopResult> run_token_loop(std::vector<float> logits, int32_t max_tokens, int32_t eos,
                                       const TokenLoop& loop) {
  return run_token_loop(std::move(logits), max_tokens, std::span<const int32_t>(&eos, 1), loop);
}

Result<TokenLoopResult> run_token_loop(std::vector<float> logits, int32_t max_tokens, std::span<const int32_t> stops,
                                       const TokenLoop& loop) {
  TokenLoopResult out;
  // Speculation in progress: its drafts (in the cache), the logits after each
  // (rows[0] came after the speculated token), how many were kept, rows chosen from.
  std::vector<int32_t> drafts;
  std::vector<float> rows;
  size_t kept = 0;
  int32_t used = 0;
  bool speculating = false;
  const size_t vocab = logits.size();
  // The drafts not kept leave the cache.
  auto settle = [&](bool rejected) -> Status {
    if (!speculating) return ok_status();
    speculating = false;
    if (kept < drafts.size())
      if (auto s = loop.drop(int32_t(drafts.size() - kept), rejected); !s) return s;
    if (loop.on_speculated) loop.on_speculated(used);
    return ok_status();
  };
  for (int32_t i = 0; i < max_tokens; ++i) {
    const int32_t next = loop.choose(logits);
    if (speculating) ++used;
    if (std::find(stops.begin(), stops.end(), next) != stops.end()) {
      out.stopped_at_eos = true;
      if (auto s = settle(false); !s) return s.error();
      break;
    }
    out.tokens.push_back(next);
    if (loop.on_token) loop.on_token(next, logits);
    const bool pending = speculating && kept < drafts.size();
    // Drafts still pending sit in the cache beyond what is kept: the context has room.
    if (i + 1 == max_tokens || (!pending && loop.context_full())) {
      if (auto s = settle(false); !s) return s.error();
      break;
    }
    if (pending && drafts[kept] == next) {  // the draft was right: its row is the next logits
      ++kept;
      logits.assign(rows.begin() + ptrdiff_t(kept * vocab), rows.begin() + ptrdiff_t((kept + 1) * vocab));
      continue;
    }
    if (auto s = settle(true); !s) return s.error();
    if (!loop.speculate) {
      if (auto s = loop.decode(next, logits); !s) return s.error();
      continue;
    }
    if (auto s = loop.speculate(next, max_tokens - i - 2, drafts, rows); !s) return s.error();
    if (rows.size() != (drafts.size() + 1) * vocab)
      return Error{fmt::format("speculation: {} logits for {} drafts of a {}-token vocabulary", rows.size(),
                               drafts.size(), vocab)};
    speculating = true;
    kept = 0;
    used = 0;
    logits.assign(rows.begin(), rows.begin() + ptrdiff_t(vocab));
  }
  return out;
}

void speculate_with(TokenLoop& loop, Engine& engine, KvSequence& seq) {
  if (!engine.speculation().active()) return;
  loop.speculate = [&engine, &seq](int32_t token, int32_t max_drafts, std::vector<int32_t>& drafts,
                                   std::vector<float>& rows) -> Status {
    Engine::Speculated made;
    if (auto s = engine.speculate(seq, token, max_drafts, made); !s) return s;
    drafts = std::move(made.drafts);
    rows = std::move(made.rows);
    return ok_status();
  };
  loop.drop = [&engine, &seq](int32_t count, bool rejected) { return engine.drop_drafts(seq, count, rejected); };
}

Result<GenerationResult> generate(Engine& engine, const std::vector<int32_t>& prompt, int32_t max_tokens,
                                  const SamplerOptions& sampling,
                                  const std::function<void(const std::string&)>& on_text,
                                  std::span<const int32_t> extra_stops) {
  if (prompt.empty()) return Error{"generate: the prompt has no tokens"};
  if (max_tokens < 0) return Error{fmt::format("generate: max tokens {} is negative", max_tokens)};
  auto sampler = Sampler::create(sampling);
  if (!sampler) return sampler.error();
  const Tokenizer& tok = engine.model().tokenizer();
  GenerationResult result;
  result.prompt_tokens = prompt;
  auto seq = engine.new_sequence();
  Utf8Stream stream;

  auto t0 = Clock::now();
  auto logits = engine.prefill(*seq, prompt);
  if (!logits) return logits.error();
  bool first = true;
  TokenLoop loop;
  // TTFT and each step's time end with the token chosen, and the next step's
  // time starts there (a token a speculation drafted right costs what choosing it does).
  loop.choose = [&](std::span<const float> l) {
    const int32_t next = sampler->sample(l);
    (first ? result.prefill_seconds : result.decode_seconds.emplace_back()) = seconds_since(t0);
    first = false;
    t0 = Clock::now();
    return next;
  };
  loop.decode = [&](int32_t token, std::vector<float>& out) -> Status {
    auto next = engine.decode(*seq, token);
    if (!next) return next.error();
    out = std::move(*next);
    return ok_status();
  };
  loop.context_full = [&] { return seq->n_past() >= engine.max_context(); };
  speculate_with(loop, engine, *seq);
  loop.on_token = [&](int32_t token, std::span<const float>) {
    if (on_text) on_text(stream.push(tok.token_to_piece(token)));
  };
  std::vector<int32_t> stops(extra_stops.begin(), extra_stops.end());
  stops.push_back(tok.eos());
  auto tokens = run_token_loop(std::move(*logits), max_tokens, stops, loop);
  if (!tokens) return tokens.error();
  result.tokens = std::move(tokens->tokens);
  result.stopped_at_eos = tokens->stopped_at_eos;
  if (on_text) on_text(stream.flush());
  return result;
}

std::vector<PerplexityWindow> perplexity_windows(int64_t n, int32_t ctx, int32_t stride) {
  std::vector<PerplexityWindow> out;
  int64_t scored_until = 1;  // tokens [1, scored_until) have been scored
  for (int64_t begin = 0; scored_until < n; begin += stride) {
    const int64_t end = std::min(begin + ctx, n);
    if (end <= scored_until) continue;
    out.push_back({begin, end, std::max(scored_until, begin + 1)});
    scored_until = end;
  }
  return out;
}

Result<NllSum> score_window(std::span<const int32_t> tokens, const PerplexityWindow& w, const WindowFeed& feed) {
  NllSum sum;
  const auto window = tokens.subspan(size_t(w.begin), size_t(w.end - w.begin));
  // Row r predicts token begin + r + 1.
  auto status = feed(window, w.first - 1 - w.begin, [&](int64_t row, std::span<const float> logits) {
    const int64_t target = w.begin + row + 1;
    if (target < w.first || target >= w.end) return;
    sum.nll -= log_prob(logits, tokens[size_t(target)]);
    ++sum.count;
  });
  if (!status) return status.error();
  return sum;
}

Result<PerplexityResult> perplexity(Engine& engine, const std::vector<int32_t>& tokens, int32_t ctx, int32_t stride,
                                    const std::function<void()>& before_window) {
  if (ctx < 2) return Error{fmt::format("perplexity: ctx {} must be at least 2", ctx)};
  if (ctx > engine.max_context())
    return Error{fmt::format("perplexity: ctx {} exceeds the model's context {}", ctx, engine.max_context())};
  if (stride < 1 || stride > ctx) return Error{fmt::format("perplexity: stride {} must be in 1..ctx ({})", stride, ctx)};
  if (tokens.size() < 2) return Error{"perplexity: the text has fewer than 2 tokens"};
  PerplexityResult result;
  const auto t0 = Clock::now();
  double nll_sum = 0.0;
  const WindowFeed feed = [&](std::span<const int32_t> window, int64_t logits_from, const LogitsSink& sink) {
    if (before_window) before_window();
    auto seq = engine.new_sequence();
    return engine.forward(*seq, window, logits_from, sink);
  };
  for (const PerplexityWindow& w : perplexity_windows(int64_t(tokens.size()), ctx, stride)) {
    auto scored = score_window(tokens, w, feed);
    if (!scored) return scored.error();
    nll_sum += scored->nll;
    result.tokens_scored += scored->count;
    ++result.windows;
  }
  result.mean_nll = nll_sum / double(result.tokens_scored);
  result.ppl = std::exp(result.mean_nll);
  result.seconds = seconds_since(t0);
  return result;
}

std::string Utf8Stream::push(const std::string& bytes) {
  pending_ += bytes;
  // Find the start of a trailing incomplete sequence, if any.
  size_t cut = pending_.size();
  for (size_t back = 1; back <= std::min<size_t>(4, pending_.size()); ++back) {
    const unsigned char b = static_cast<unsigned char>(pending_[pending_.size() - back]);
    if ((b & 0xC0) == 0x80) continue;  // continuation byte
    const size_t need = (b & 0x80) == 0 ? 1 : (b & 0xE0) == 0xC0 ? 2 : (b & 0xF0) == 0xE0 ? 3 : (b & 0xF8) == 0xF0 ? 4 : 1;
    if (need > back) cut = pending_.size() - back;
    break;
  }
  std::string ready = pending_.substr(0, cut);
  pending_.erase(0, cut);
  return ready;
}

std::string Utf8Stream::flush() { return std::exchange(pending_, {}); }

}  // namespace inferlab
