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

Result<GenerationResult> generate(Engine& engine, const std::vector<int32_t>& prompt, int32_t max_tokens,
                                  const SamplerOptions& sampling,
                                  const std::function<void(const std::string&)>& on_text) {
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
  for (int32_t i = 0; i < max_tokens; ++i) {
    const int32_t next = sampler->sample(*logits);
    if (i == 0) result.prefill_seconds = seconds_since(t0);
    else result.decode_seconds.push_back(seconds_since(t0));
    if (next == tok.eos()) {
      result.stopped_at_eos = true;
      break;
    }
    result.tokens.push_back(next);
    if (on_text) on_text(stream.push(tok.token_to_piece(next)));
    if (i + 1 == max_tokens || seq->n_past() >= engine.max_context()) break;
    t0 = Clock::now();
    logits = engine.decode(*seq, next);
    if (!logits) return logits.error();
  }
  if (on_text) on_text(stream.flush());
  return result;
}

Result<PerplexityResult> perplexity(Engine& engine, const std::vector<int32_t>& tokens, int32_t ctx,
                                    int32_t stride) {
  if (ctx < 2) return Error{fmt::format("perplexity: ctx {} must be at least 2", ctx)};
  if (ctx > engine.max_context())
    return Error{fmt::format("perplexity: ctx {} exceeds the model's context {}", ctx, engine.max_context())};
  if (stride < 1 || stride > ctx) return Error{fmt::format("perplexity: stride {} must be in 1..ctx ({})", stride, ctx)};
  if (tokens.size() < 2) return Error{"perplexity: the text has fewer than 2 tokens"};
  PerplexityResult result;
  auto t0 = Clock::now();
  double nll_sum = 0.0;
  const int64_t n = int64_t(tokens.size());
  int64_t scored_until = 1;  // tokens [1, scored_until) have been scored
  for (int64_t begin = 0; scored_until < n; begin += stride) {
    const int64_t end = std::min(begin + ctx, n);
    if (end <= scored_until) continue;
    auto seq = engine.new_sequence();
    std::span<const int32_t> window(tokens.data() + begin, size_t(end - begin));
    // Row r predicts token begin + r + 1; score targets in [first, end). A
    // window's first token is predicted by nothing in it: with windows that do
    // not overlap (stride = ctx) it stays unscored.
    const int64_t first = std::max(scored_until, begin + 1);
    auto status = engine.forward(*seq, window, first - 1 - begin, [&](int64_t row, std::span<const float> logits) {
      const int64_t target = begin + row + 1;
      if (target < end) nll_sum -= log_prob(logits, tokens[size_t(target)]);
    });
    if (!status) return status.error();
    result.tokens_scored += end - first;
    scored_until = end;
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
