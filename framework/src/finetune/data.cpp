#include "finetune/data.h"

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <sstream>

#include "datasets/tasks.h"

namespace inferlab::finetune {

namespace {

bool ends_with(const std::string& s, const std::string& suffix) {
  return s.size() >= suffix.size() && s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

Result<std::string> read_text(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return Error{fmt::format("{}: cannot open the training data file", path)};
  std::ostringstream text;
  text << in.rdbuf();
  return text.str();
}

struct Builder {
  int64_t limit;  // seq_len + 1
  std::vector<Example> out;
  DataSummary summary;

  // A prompt/response example that does not fit whole is dropped (cutting it
  // would cut its response); other text is cut to the limit.
  void add(Example e, bool whole = false) {
    if (whole && int64_t(e.tokens.size()) > limit) {
      ++summary.dropped;
      return;
    }
    if (int64_t(e.tokens.size()) > limit) {
      e.tokens.resize(size_t(limit));
      e.predict.resize(size_t(limit));
      ++summary.truncated;
    }
    if (e.tokens.size() < 2) return;  // nothing to learn from
    const int64_t targets = std::count(e.predict.begin() + 1, e.predict.end(), uint8_t{1});
    if (targets == 0) return;
    summary.tokens += int64_t(e.tokens.size());
    summary.targets += targets;
    out.push_back(std::move(e));
  }
};

// Every token after the first predicted.
Example whole_text(std::vector<int32_t> tokens) {
  Example e;
  e.tokens = std::move(tokens);
  e.predict.assign(e.tokens.size(), 1);
  if (!e.predict.empty()) e.predict[0] = 0;
  return e;
}

// Plain text: the whole file's tokens in windows of `limit` tokens that
// overlap by one (each window's last token is the next one's first), every
// token predicted.
void add_text(Builder& b, const Tokenizer& tok, const std::string& text) {
  const std::vector<int32_t> ids = tok.encode(text, tok.add_bos_default(), false);
  const int64_t step = b.limit - 1;
  for (int64_t begin = 0; begin + 1 < int64_t(ids.size()); begin += step) {
    const int64_t end = std::min<int64_t>(begin + b.limit, int64_t(ids.size()));
    b.add(whole_text(std::vector<int32_t>(ids.begin() + begin, ids.begin() + end)));
  }
}

// A prompt (not predicted) followed by a response (predicted, then EOS).
Example prompt_response(const Tokenizer& tok, const std::vector<int32_t>& prompt, const std::string& response) {
  Example e;
  e.tokens = prompt;
  e.predict.assign(e.tokens.size(), 0);
  for (int32_t t : tok.encode(response, false, false)) {
    e.tokens.push_back(t);
    e.predict.push_back(1);
  }
  if (tok.eos() >= 0) {
    e.tokens.push_back(tok.eos());
    e.predict.push_back(1);
  }
  return e;
}

Status add_jsonl(Builder& b, const Tokenizer& tok, const std::string& path, const std::string& text) {
  std::istringstream lines(text);
  int64_t line_no = 0;
  for (std::string line; std::getline(lines, line);) {
    ++line_no;
    if (line.find_first_not_of(" \t\r") == std::string::npos) continue;
    const std::string where = fmt::format("{}:{}", path, line_no);
    nlohmann::json j;
    try {
      j = nlohmann::json::parse(line);
    } catch (const nlohmann::json::exception& e) {
      return Error{fmt::format("{}: not JSON ({})", where, e.what())};
    }
    auto text_of = [&](const char* key) -> std::optional<std::string> {
      if (!j.is_object() || !j.contains(key)) return std::nullopt;
      if (!j[key].is_string()) return std::nullopt;
      return j[key].get<std::string>();
    };
    if (!j.is_object()) return Error{fmt::format("{}: expected a JSON object", where)};
    const auto prompt = text_of("prompt"), response = text_of("response"), plain = text_of("text");
    if (prompt && response) {
      b.add(prompt_response(tok, tok.encode(*prompt, tok.add_bos_default(), false), *response), true);
    } else if (plain) {
      b.add(whole_text(tok.encode(*plain, tok.add_bos_default(), false)));
    } else {
      return Error{fmt::format("{}: expected string fields \"prompt\" and \"response\" (loss on the response), or "
                               "\"text\"",
                               where)};
    }
  }
  return ok_status();
}

}  // namespace

Result<std::vector<Example>> load_examples(const FinetuneSection& config, const Tokenizer& tok, int32_t max_context,
                                           DataSummary* summary) {
  Builder b{config.seq_len + 1, {}, {}};
  for (const std::string& path : config.data) {
    auto text = read_text(path);
    if (!text) return text.error();
    const bool jsonl =
        config.data_format == "jsonl" || (config.data_format == "auto" && (ends_with(path, ".jsonl")));
    const size_t before = b.out.size();
    if (jsonl) {
      if (auto st = add_jsonl(b, tok, path, *text); !st) return st.error();
    } else {
      add_text(b, tok, *text);
    }
    if (b.out.size() == before)
      return Error{fmt::format("{}: no training examples in it (empty, nothing to predict, or {} prompt/response "
                               "examples longer than finetune.seq_len + 1 = {} tokens)",
                               path, b.summary.dropped, config.seq_len + 1)};
  }
  if (!config.corpus.empty()) {
    auto path = resolve_corpus(config.corpus);
    if (!path) return Error{"finetune.corpus: " + path.message()};
    auto text = read_text(path->string());
    if (!text) return text.error();
    std::string_view part(*text);
    if (!config.corpus_bytes.empty()) {
      // Widened to whole lines: from the line holding `begin` to the end of the line holding `end - 1`.
      const size_t size = part.size();
      if (size_t(config.corpus_bytes[0]) >= size)
        return Error{fmt::format("finetune.corpus_bytes: begins at {} but {} has {} bytes", config.corpus_bytes[0],
                                 path->string(), size)};
      size_t begin = part.rfind('\n', size_t(config.corpus_bytes[0]));
      begin = begin == std::string_view::npos ? 0 : begin + 1;
      size_t end = part.find('\n', std::min(size, size_t(config.corpus_bytes[1])) - 1);
      end = end == std::string_view::npos ? size : end + 1;
      part = part.substr(begin, end - begin);
    }
    const size_t before = b.out.size();
    add_text(b, tok, std::string(part));
    if (b.out.size() == before) return Error{fmt::format("finetune.corpus: no training examples in {}", path->string())};
  }
  if (config.task) {
    auto task = make_task(config.task->type, config.task->params);
    if (!task) return Error{"finetune.task: " + task.message()};
    // Training samples come from the fine-tuning seed, so an evaluation with
    // the experiment's seeds draws other ones.
    auto samples = (*task)->samples(tok, max_context, uint64_t(config.seed) ^ 0x5eedf17eull);
    if (!samples) return Error{"finetune.task: " + samples.message()};
    const size_t before = b.out.size();
    for (const TaskSample& s : *samples) {
      if ((*task)->kind() == TaskKind::Perplexity || (s.answer.empty() && s.expected.empty())) {
        b.add(whole_text(s.prompt_tokens));
      } else {
        b.add(prompt_response(tok, s.prompt_tokens, s.answer.empty() ? " " + s.expected[0] : s.answer), true);
      }
    }
    if (b.out.size() == before)
      return Error{fmt::format("finetune.task: task {} gave no training examples ({} longer than finetune.seq_len + 1 "
                               "= {} tokens)",
                               config.task->type, b.summary.dropped, config.seq_len + 1)};
  }
  if (b.out.empty()) return Error{"finetune.data: no training examples"};
  if (summary) {
    *summary = b.summary;
    summary->examples = int64_t(b.out.size());
  }
  return std::move(b.out);
}

Batch make_batch(const std::vector<Example>& examples, const std::vector<int64_t>& which) {
  Batch b;
  b.sequences = int64_t(which.size());
  for (int64_t i : which) b.seq_len = std::max<int64_t>(b.seq_len, int64_t(examples[size_t(i)].tokens.size()) - 1);
  b.tokens.assign(size_t(b.sequences * b.seq_len), 0);
  b.targets.assign(b.tokens.size(), -1);
  for (size_t s = 0; s < which.size(); ++s) {
    const Example& e = examples[size_t(which[s])];
    for (size_t t = 0; t + 1 < e.tokens.size(); ++t) {
      b.tokens[s * size_t(b.seq_len) + t] = e.tokens[t];
      if (e.predict[t + 1]) b.targets[s * size_t(b.seq_len) + t] = e.tokens[t + 1];
    }
  }
  return b;
}

}  // namespace inferlab::finetune
