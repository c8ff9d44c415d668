// Filler text with needles, fitted to a token budget. Lengths are measured with
// the model's own tokenizer, so a "512-token prompt" is 512 tokens for that model.
#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <numeric>

#include "datasets/task_support.h"

namespace inferlab::tasks {

namespace {

// Plain sentences with no digits, keys or capitalised codes, so nothing in the
// filler can be mistaken for an answer. The short ones close the last gap.
constexpr std::string_view kFiller[] = {
    " The grass is green.", " The sky is blue.", " The sun is warm today.", " The river runs down to the sea.",
    " Clouds drift slowly over the hills.", " Birds sing early in the morning.", " The wind moves through the trees.",
    " The field is quiet in the evening.", " Rain falls softly on the roof.", " The moon rises late tonight.",
    " Stars fill the clear night sky.", " The path leads back home.", " Leaves turn gold in the autumn.",
    " The lake is calm and still.", " A fox sleeps under the hedge.", " Bees hum among the flowers.",
    " Snow covers the top of the mountain.", " The road is long and dry.", " Here we go again.",
    " On and on it goes.", " The day is bright and clear.", " The stones are cold by the stream.",
    " Waves roll gently onto the sand.", " The forest is dark and deep.", " Smoke rises from the chimney.",
    " The garden is full of roses.", " Frogs call from the pond at dusk.", " The hills are soft and round.",
    " Mist lies low in the valley.", " The bell rings at noon.", " All is well.", " Go on.", " Look up.",
    " Rest now.", " So it goes.",
};

struct Filler {
  std::vector<int32_t> ids;     // indexes into kFiller, in prompt order
  std::vector<int32_t> tokens;  // token count of each kFiller sentence
  int32_t min_tokens = 0;

  int32_t total() const {
    return std::accumulate(ids.begin(), ids.end(), 0, [&](int32_t s, int32_t i) { return s + tokens[size_t(i)]; });
  }
};

Filler measure_filler(const Tokenizer& tok) {
  Filler f;
  for (auto s : kFiller) f.tokens.push_back(count_tokens(tok, std::string(s)));
  f.min_tokens = *std::min_element(f.tokens.begin(), f.tokens.end());
  return f;
}

// Random sentences while they fit, then the longest that still fits, until
// fewer tokens remain than the shortest sentence takes.
void add_filler(Filler& f, int32_t budget, Rng& rng) {
  const int32_t n = int32_t(std::size(kFiller));
  while (budget >= f.min_tokens) {
    int32_t pick = int32_t(rng.below(uint64_t(n)));
    if (!f.ids.empty() && pick == f.ids.back()) pick = (pick + 1) % n;  // no sentence twice in a row
    if (f.tokens[size_t(pick)] > budget) {
      pick = -1;
      for (int32_t i = 0; i < n; ++i)
        if (f.tokens[size_t(i)] <= budget && (pick < 0 || f.tokens[size_t(i)] > f.tokens[size_t(pick)])) pick = i;
    }
    f.ids.push_back(pick);
    budget -= f.tokens[size_t(pick)];
  }
}

// Each insert goes to the sentence boundary whose share of the filler tokens
// before it is closest to its depth; inserts at one boundary keep their order.
std::string assemble(const HaystackSpec& spec, const Filler& f) {
  const double total = std::max(1, f.total());
  std::vector<size_t> order(spec.inserts.size());
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(),
                   [&](size_t a, size_t b) { return spec.inserts[a].first < spec.inserts[b].first; });
  std::string text = spec.head;
  size_t next = 0;
  int32_t before = 0;  // filler tokens already placed
  for (size_t s = 0; s <= f.ids.size(); ++s) {
    const double next_share = s < f.ids.size() ? (before + f.tokens[size_t(f.ids[s])]) / total : 2.0;
    while (next < order.size() &&
           std::abs(spec.inserts[order[next]].first - before / total) <=
               std::abs(spec.inserts[order[next]].first - next_share))
      text += spec.inserts[order[next++]].second;
    if (s == f.ids.size()) break;
    text += kFiller[size_t(f.ids[s])];
    before += f.tokens[size_t(f.ids[s])];
  }
  return text + spec.tail;
}

// How many of the prompt's last tokens encode the tail: those after the longest
// common prefix with the encoding of the text before the tail (a token that
// straddles the boundary counts as the question's).
int32_t tail_token_count(const Tokenizer& tok, const BuiltPrompt& built, const std::string& tail) {
  const auto before = encode_prompt(tok, built.text.substr(0, built.text.size() - tail.size()));
  const auto& t = built.tokens;
  size_t i = 0;
  while (i < before.size() && i < t.size() && before[i] == t[i]) ++i;
  return int32_t(t.size() - i);
}

}  // namespace

Result<BuiltPrompt> build_haystack(const Tokenizer& tok, const HaystackSpec& spec, Rng& rng) {
  int32_t fixed = count_tokens(tok, spec.head) + count_tokens(tok, spec.tail) + (adds_bos(tok) ? 1 : 0);
  for (const auto& insert : spec.inserts) fixed += count_tokens(tok, insert.second);
  if (fixed > spec.length)
    return Error{fmt::format("length {} is too short: the instructions, question and needles alone take {} tokens",
                             spec.length, fixed)};
  Filler filler = measure_filler(tok);
  add_filler(filler, spec.length - fixed, rng);
  // Pieces were counted apart; joined, a boundary can tokenize differently
  // (some pre-tokenizers join ".\n"), so measure the whole and correct.
  for (int round = 0;; ++round) {
    BuiltPrompt built{assemble(spec, filler), {}};
    built.tokens = encode_prompt(tok, built.text);
    const int32_t n = int32_t(built.tokens.size());
    if (n > spec.length && !filler.ids.empty()) {
      filler.ids.pop_back();
      continue;
    }
    if (n > spec.length)
      return Error{fmt::format("length {} is too short for this prompt ({} tokens without filler)", spec.length, n)};
    if (spec.length - n < filler.min_tokens || round >= 8) {
      built.tail_tokens = tail_token_count(tok, built, spec.tail);
      return built;
    }
    add_filler(filler, spec.length - n, rng);
  }
}

}  // namespace inferlab::tasks
