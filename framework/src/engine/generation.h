// Text generation and perplexity on top of the engine: the one token loop and
// the one window scorer that `inferlab generate | perplexity` and the
// experiment tasks (experiment/measure.cpp) share.
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "engine/engine.h"
#include "engine/sampler.h"

namespace inferlab {

struct GenerationResult {
  std::vector<int32_t> prompt_tokens;
  std::vector<int32_t> tokens;  // generated
  double prefill_seconds = 0.0;  // prompt forward + first token (TTFT)
  std::vector<double> decode_seconds;  // per generated token after the first
  bool stopped_at_eos = false;
};

// The token loop: choose a token from the current logits; stop at EOS; keep
// it; stop when max_tokens are kept or the context is full; else decode it
// for the next logits.
//
// With `speculate` (self-speculative decoding, Engine::speculate) a kept token
// goes there instead of to `decode`: it returns drafts already in the cache
// and the logits after the token and after each draft. The loop chooses from
// those rows in turn; while its choice is the next draft, that draft is kept
// at no cost; at the first difference the drafts left go (`drop`) and the
// choice is speculated from. `choose` sees exactly the rows it would see
// without speculation, once each, so greedy output and a sampler's random
// stream are unchanged.
struct TokenLoop {
  std::function<int32_t(std::span<const float>)> choose;                  // argmax, or a sampler
  std::function<Status(int32_t token, std::vector<float>& logits)> decode;  // the token's step: its logits
  std::function<bool()> context_full;
  std::function<void(int32_t token, std::span<const float> from)> on_token;  // optional: each kept token
  // Optional: speculation. `max_drafts`: more than that could not be kept.
  std::function<Status(int32_t token, int32_t max_drafts, std::vector<int32_t>& drafts, std::vector<float>& rows)>
      speculate;
  std::function<Status(int32_t count, bool rejected)> drop;  // the cache's last `count` drafts go
  std::function<void(int32_t rows_used)> on_speculated;      // optional: a speculation's rows the loop chose from
};
// `loop.speculate` and `loop.drop` on `engine` and `seq` when the engine's
// method speculates (else unchanged).
void speculate_with(TokenLoop& loop, Engine& engine, KvSequence& seq);
struct TokenLoopResult {
  std::vector<int32_t> tokens;  // kept (EOS is not)
  bool stopped_at_eos = false;
};
Result<TokenLoopResult> run_token_loop(std::vector<float> logits, int32_t max_tokens, int32_t eos, const TokenLoop& loop);
// The same, stopping at any of `stops` (EOS and a chat format's end of turn).
Result<TokenLoopResult> run_token_loop(std::vector<float> logits, int32_t max_tokens, std::span<const int32_t> stops,
                                       const TokenLoop& loop);

// Streams text pieces through `on_text` (whole UTF-8 characters only). Stops
// at EOS, and at any of extra_stops.
Result<GenerationResult> generate(Engine& engine, const std::vector<int32_t>& prompt, int32_t max_tokens,
                                  const SamplerOptions& sampling,
                                  const std::function<void(const std::string&)>& on_text,
                                  std::span<const int32_t> extra_stops = {});

// log softmax(logits)[target], computed in double for stability.
double log_prob(std::span<const float> logits, int32_t target);

struct PerplexityResult {
  double ppl = 0.0;
  double mean_nll = 0.0;
  int64_t tokens_scored = 0;
  int64_t windows = 0;
  double seconds = 0.0;
};

// One perplexity window: tokens [begin, end) fed to a fresh sequence; targets
// [first, end) scored, each predicted by the row before it.
struct PerplexityWindow {
  int64_t begin = 0, end = 0, first = 1;
};
// The windows of ctx tokens advanced by stride over n tokens: each scores the
// tokens no earlier window scored (a window's first token is predicted by
// nothing in it, so with stride = ctx it stays unscored).
std::vector<PerplexityWindow> perplexity_windows(int64_t n, int32_t ctx, int32_t stride);

struct NllSum {
  double nll = 0;     // summed negative log-likelihood of the scored targets
  int64_t count = 0;  // targets scored
};
// Scores one window: `feed` runs the window's tokens through a fresh sequence,
// computing logits from row `logits_from` on and handing each (window row,
// logits) to the sink.
using WindowFeed = std::function<Status(std::span<const int32_t> window, int64_t logits_from, const LogitsSink& sink)>;
Result<NllSum> score_window(std::span<const int32_t> tokens, const PerplexityWindow& window, const WindowFeed& feed);

// Perplexity of `tokens` in windows of `ctx` tokens advanced by `stride`: each
// window scores only the tokens not scored by an earlier window, conditioned on
// up to ctx - 1 tokens before them (the sliding-window evaluation of HF docs).
// `before_window`, when given, runs before each window's fresh sequence (a
// method's begin_sequence).
Result<PerplexityResult> perplexity(Engine& engine, const std::vector<int32_t>& tokens, int32_t ctx, int32_t stride,
                                    const std::function<void()>& before_window = {});

// Splits UTF-8 bytes into what can be printed now and what must wait for more bytes.
class Utf8Stream {
 public:
  std::string push(const std::string& bytes);
  std::string flush();

 private:
  std::string pending_;
};

}  // namespace inferlab
