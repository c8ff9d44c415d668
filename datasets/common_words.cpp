// RULER common-word extraction (Hsieh et al., 2024): a numbered list in which
// `top_k` words repeat many times and the others once or twice (more often only
// when a long list exhausts the word list, and always fewer times than the
// common ones); the model must name the top_k words.
#include <fmt/format.h>

#include <algorithm>
#include <map>

#include "datasets/task_support.h"

namespace inferlab::tasks {

namespace {

constexpr const char* kHead =
    "Below is a numbered list of words. A few words appear in it many times, the others only a few times.";

// Token costs of the list's pieces; numbering and word are counted apart
// because the list is shuffled after it is sized.
class ListCost {
 public:
  explicit ListCost(const Tokenizer& tok) : tok_(tok) {}
  int32_t number(size_t i) { return count_tokens(tok_, fmt::format("\n{}.", i)); }
  int32_t word(const std::string& w) {
    auto [it, fresh] = words_.try_emplace(w, 0);
    if (fresh) it->second = count_tokens(tok_, " " + w);
    return it->second;
  }

 private:
  const Tokenizer& tok_;
  std::map<std::string, int32_t> words_;
};

struct WordList {
  std::vector<std::string> entries;  // in list order
  std::vector<std::string> common;
  int32_t common_count = 0;  // occurrences of each common word
};

// Occurrences of each common word: enough that they fill about a quarter of
// the list, and never fewer than 3 (uncommon words appear at most twice).
int32_t common_repeats(ListCost& cost, const std::vector<std::string>& pool, int32_t budget, int32_t top_k) {
  double mean_word = 0;
  for (const auto& w : pool) mean_word += cost.word(w);
  mean_word /= double(pool.size());
  const double entries = budget / (mean_word + cost.number(size_t(budget / 4 + 1)));
  return std::max(3, int32_t(entries / (4.0 * top_k)));
}

// Common words first, then uncommon ones (1 or 2 copies each, cycling through
// the pool), while they fit in `budget` tokens; then shuffled.
Result<WordList> fill_list(const Tokenizer& tok, Rng& rng, int32_t budget, int32_t top_k) {
  std::vector<std::string> words(word_list().begin(), word_list().end());
  rng.shuffle(words);
  WordList list;
  list.common.assign(words.begin(), words.begin() + top_k);
  const std::vector<std::string> pool(words.begin() + top_k, words.end());
  ListCost cost(tok);
  list.common_count = common_repeats(cost, pool, budget, top_k);
  int32_t used = 0;
  auto add = [&](const std::string& w) {
    list.entries.push_back(w);
    used += cost.number(list.entries.size()) + cost.word(w);
  };
  for (int32_t r = 0; r < list.common_count; ++r)
    for (const auto& w : list.common) add(w);
  if (used > budget)
    return Error{fmt::format("top_k {} needs about {} tokens for its repeated words alone, more than the length allows",
                             top_k, used)};
  std::map<std::string, int32_t> seen;
  for (size_t i = 0, misses = 0; misses < pool.size(); ++i) {
    const std::string& w = pool[i % pool.size()];
    int32_t copies = std::min<int32_t>(1 + int32_t(rng.below(2)), list.common_count - 1 - seen[w]);
    while (copies > 0 && used + copies * (cost.number(list.entries.size() + 1) + cost.word(w)) > budget) --copies;
    misses = copies == 0 ? misses + 1 : 0;
    for (int32_t c = 0; c < copies; ++c, ++seen[w]) add(w);
  }
  rng.shuffle(list.entries);
  return list;
}

std::string render(const std::string& tail, const std::vector<std::string>& entries) {
  std::string text = kHead;
  for (size_t i = 0; i < entries.size(); ++i) text += fmt::format("\n{}. {}", i + 1, entries[i]);
  return text + tail;
}

// Drops the last entry that is not a common word; false when none is left.
bool drop_last_uncommon(WordList& list) {
  auto last = std::find_if(list.entries.rbegin(), list.entries.rend(), [&](const std::string& w) {
    return std::find(list.common.begin(), list.common.end(), w) == list.common.end();
  });
  if (last == list.entries.rend()) return false;
  list.entries.erase(std::next(last).base());
  return true;
}

class CommonWordsTask final : public GridTask {
 public:
  explicit CommonWordsTask(const TaskParams& p)
      : GridTask("common_words", p, /*has_depths=*/false), top_k_(int32_t(p.get_int("top_k"))) {
    size_t longest = 0;
    for (auto w : word_list()) longest = std::max(longest, w.size());
    if (max_new_tokens_ == 0) max_new_tokens_ = answer_token_budget(top_k_, int32_t(longest));
  }

 private:
  std::string seed_key() const override { return std::to_string(top_k_); }

  Status fill(const Tokenizer& tok, int64_t length, double, Rng& rng, TaskSample& sample) const override {
    const std::string tail = fmt::format(
        "\nQuestion: What are the {0} most common words in the list above? Answer: The {0} most common words are:",
        top_k_);
    const int32_t fixed = count_tokens(tok, kHead) + count_tokens(tok, tail) + (adds_bos(tok) ? 1 : 0);
    if (fixed >= length)
      return Error{fmt::format("length {} is too short: the instructions and question alone take {} tokens", length,
                               fixed)};
    auto list = fill_list(tok, rng, int32_t(length) - fixed, top_k_);
    if (!list) return Error{fmt::format("length {}: {}", length, list.message())};
    // Pieces were counted apart: drop uncommon entries while the whole is too long.
    sample.prompt_tokens = encode_prompt(tok, render(tail, list->entries));
    while (int64_t(sample.prompt_tokens.size()) > length) {
      if (!drop_last_uncommon(*list)) return Error{fmt::format("length {} is too short for top_k {}", length, top_k_)};
      sample.prompt_tokens = encode_prompt(tok, render(tail, list->entries));
    }
    sample.expected = list->common;
    sample.tags["top_k"] = top_k_;
    sample.tags["common_repeats"] = list->common_count;
    sample.tags["list_entries"] = double(list->entries.size());
    return ok_status();
  }

  int32_t top_k_;
};

}  // namespace

std::vector<TaskParamSpec> common_words_params() {
  return {
      lengths_param(),
      samples_param(4, "samples per length"),
      {ParamSpec::integer("top_k", 5, 1, 20, "how many most frequent words the model must name"), false},
      max_new_tokens_param(0),
  };
}

Result<std::unique_ptr<Task>> make_common_words(const TaskParams& params) {
  return std::unique_ptr<Task>(std::make_unique<CommonWordsTask>(params));
}

}  // namespace inferlab::tasks
