// Text generation and perplexity on top of the engine.
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

// Streams text pieces through `on_text` (whole UTF-8 characters only).
Result<GenerationResult> generate(Engine& engine, const std::vector<int32_t>& prompt, int32_t max_tokens,
                                  const SamplerOptions& sampling,
                                  const std::function<void(const std::string&)>& on_text);

// log softmax(logits)[target], computed in double for stability.
double log_prob(std::span<const float> logits, int32_t target);

struct PerplexityResult {
  double ppl = 0.0;
  double mean_nll = 0.0;
  int64_t tokens_scored = 0;
  int64_t windows = 0;
  double seconds = 0.0;
};

// Perplexity of `tokens` in windows of `ctx` tokens advanced by `stride`: each
// window scores only the tokens not scored by an earlier window, conditioned on
// up to ctx - 1 tokens before them (the sliding-window evaluation of HF docs).
Result<PerplexityResult> perplexity(Engine& engine, const std::vector<int32_t>& tokens, int32_t ctx, int32_t stride);

// Splits UTF-8 bytes into what can be printed now and what must wait for more bytes.
class Utf8Stream {
 public:
  std::string push(const std::string& bytes);
  std::string flush();

 private:
  std::string pending_;
};

}  // namespace inferlab
