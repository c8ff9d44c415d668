// Corpus tasks: perplexity over segments of a long natural text, and fidelity
// prompts cut from the same text. Segments are non-overlapping, at seeded
// random token offsets, sorted; only the prefix of the corpus they need is
// tokenized (the default corpus is 4 MB).
#include <fmt/format.h>

#include <algorithm>
#include <cstdlib>
#include <fstream>
#include <sstream>

#include "datasets/task_support.h"

namespace inferlab {

std::filesystem::path corpus_dir() {
  if (const char* dir = std::getenv("INFERLAB_CORPUS_DIR"); dir != nullptr && *dir != '\0') return dir;
  const char* home = std::getenv("HOME");
  return std::filesystem::path(home != nullptr ? home : ".") / ".cache" / "inferlab" / "corpora";
}

Result<std::filesystem::path> resolve_corpus(const std::string& name_or_path) {
  if (name_or_path == "kjv") {
    auto path = corpus_dir() / "kjv.txt";
    if (!std::filesystem::is_regular_file(path))
      return Error{fmt::format("corpus 'kjv' is not installed (expected {}); run scripts/fetch-corpus.sh",
                               path.string())};
    return path;
  }
  std::filesystem::path path(name_or_path);
  if (!std::filesystem::exists(path))
    return Error{fmt::format("corpus file '{}' not found; give the path of a text file, or \"kjv\" after running "
                             "scripts/fetch-corpus.sh",
                             name_or_path)};
  if (!std::filesystem::is_regular_file(path))
    return Error{fmt::format("corpus '{}' is not a regular file", name_or_path)};
  return path;
}

namespace tasks {

namespace {

Result<std::string> read_corpus(const std::filesystem::path& path) {
  std::ifstream in(path, std::ios::binary);
  std::ostringstream text;
  if (!in || !(text << in.rdbuf())) return Error{fmt::format("corpus {}: cannot read the file", path.string())};
  return text.str();
}

// Tokens of a prefix of `text` ending at a line break, at least `want` of them
// when the text has that many. Cutting at a line break keeps the prefix's
// tokens identical to those of the whole text.
std::vector<int32_t> tokenize_prefix(const Tokenizer& tok, const std::string& text, size_t want) {
  for (size_t bytes = std::max<size_t>(want * 4, 4096);; bytes *= 2) {
    const size_t line_end = bytes >= text.size() ? std::string::npos : text.find('\n', bytes);
    const size_t cut = line_end == std::string::npos ? text.size() : line_end;
    auto tokens = tok.encode(std::string_view(text).substr(0, cut), false, /*parse_special=*/false);
    if (tokens.size() >= want || cut == text.size()) return tokens;
  }
}

struct Segment {
  std::vector<int32_t> tokens;  // BOS (when the tokenizer adds one) then corpus tokens
  int64_t offset = 0;           // of the first corpus token, in corpus tokens
};

// `count` segments of `length` tokens (BOS included) drawn from the first
// 4 * count * length corpus tokens, each gap between them uniformly random.
// The built-in "kv_retrieval" corpus: a long JSON object of random UUID keys
// and values, as in LongChat's key-value retrieval task (the kind of prompt
// MInference searches its head patterns on). Deterministic; about 1 MB.
std::string kv_retrieval_text() {
  Rng rng(0x6b76);
  auto uuid = [&] {
    static const char* hex = "0123456789abcdef";
    std::string u;
    for (int i = 0; i < 32; ++i) {
      if (i == 8 || i == 12 || i == 16 || i == 20) u += '-';
      u += hex[rng.below(16)];
    }
    return u;
  };
  std::string text = "JSON data:\n{";
  for (int i = 0; i < 12000; ++i) text += fmt::format("{}\"{}\": \"{}\"", i == 0 ? "" : ", ", uuid(), uuid());
  return text + "}\n";
}

Result<std::vector<Segment>> corpus_segments(const Tokenizer& tok, const std::string& corpus, int64_t count,
                                             int64_t length, Rng& rng) {
  const bool builtin = corpus == "kv_retrieval";
  auto path = builtin ? Result<std::filesystem::path>(std::filesystem::path("kv_retrieval")) : resolve_corpus(corpus);
  if (!path) return path.error();
  auto text = builtin ? Result<std::string>(kv_retrieval_text()) : read_corpus(*path);
  if (!text) return text.error();
  const bool bos = adds_bos(tok);
  const int64_t body = length - (bos ? 1 : 0), need = count * body;
  auto tokens = tokenize_prefix(tok, *text, size_t(4 * need));
  if (int64_t(tokens.size()) < need)
    return Error{fmt::format("corpus {} has {} tokens for this model: {} windows of {} tokens fit, {} were asked "
                             "(they need {} corpus tokens)",
                             path->string(), tokens.size(), int64_t(tokens.size()) / body, length, count, need)};
  tokens.resize(std::min(tokens.size(), size_t(4 * need)));
  std::vector<int64_t> gaps(static_cast<size_t>(count));
  for (auto& g : gaps) g = int64_t(rng.below(uint64_t(int64_t(tokens.size()) - need + 1)));
  std::sort(gaps.begin(), gaps.end());
  std::vector<Segment> out;
  for (int64_t i = 0; i < count; ++i) {
    const int64_t offset = gaps[size_t(i)] + i * body;
    std::vector<int32_t> segment(tokens.begin() + offset, tokens.begin() + offset + body);
    if (bos) segment.insert(segment.begin(), tok.bos());
    out.push_back({std::move(segment), offset});
  }
  return out;
}

// Perplexity and fidelity differ only in what the runner does with a sample:
// perplexity scores it, fidelity generates `new_tokens` after it.
class CorpusTask final : public Task {
 public:
  struct Config {
    std::string name;
    TaskKind kind;
    std::string length_param;  // "length" or "prompt_tokens", for error messages
    int32_t new_tokens = 0;    // fidelity only
    int32_t chunk = 0;         // perplexity only
  };
  CorpusTask(Config config, const TaskParams& p)
      : config_(std::move(config)),
        path_(p.get_string("path")),
        length_(p.get_int(config_.length_param)),
        samples_(p.get_int("samples")) {}

  const std::string& name() const override { return config_.name; }
  TaskKind kind() const override { return config_.kind; }
  int32_t chunk_tokens() const override { return config_.chunk; }

  Result<std::vector<TaskSample>> samples(const Tokenizer& tok, int32_t max_context, uint64_t seed) const override {
    if (length_ + config_.new_tokens > max_context)
      return Error{fmt::format("task '{}': {} {}{} exceeds max_context {}", config_.name, config_.length_param,
                               length_,
                               config_.new_tokens > 0 ? fmt::format(" plus new_tokens {}", config_.new_tokens) : "",
                               max_context)};
    Rng rng(sample_seed(seed, config_.name, {uint64_t(length_), uint64_t(samples_)}));
    auto segments = corpus_segments(tok, path_, samples_, length_, rng);
    if (!segments) return Error{fmt::format("task '{}': {}", config_.name, segments.message())};
    std::vector<TaskSample> out;
    for (size_t i = 0; i < segments->size(); ++i) {
      TaskSample s;
      s.id = fmt::format("len{}-s{}", length_, i);
      s.prompt_tokens = std::move((*segments)[i].tokens);
      s.max_new_tokens = config_.new_tokens;
      s.tags = {{"context_tokens", double(s.prompt_tokens.size())}, {"offset", double((*segments)[i].offset)}};
      out.push_back(std::move(s));
    }
    return out;
  }

 private:
  Config config_;
  std::string path_;
  int64_t length_;
  int64_t samples_;
};

ParamSpec corpus_path_param() {
  return ParamSpec::string("path", "kjv", {},
                           "corpus: \"kjv\" (the King James Bible, fetched by scripts/fetch-corpus.sh) or a text "
                           "file path");
}

}  // namespace

std::vector<TaskParamSpec> perplexity_params() {
  return {
      {corpus_path_param(), false},
      {ParamSpec::integer("length", 512, 2, 1 << 24, "tokens per sample, BOS included"), false},
      {ParamSpec::integer("samples", 4, 1, 100000, "segments scored"), false},
      {ParamSpec::integer("chunk", 0, 0, 1 << 24, "tokens per forward call; 0: the whole sample at once"), false},
  };
}

std::vector<TaskParamSpec> fidelity_params() {
  return {
      {corpus_path_param(), false},
      {ParamSpec::integer("prompt_tokens", 256, 2, 1 << 24, "prompt length in tokens, BOS included"), false},
      {ParamSpec::integer("samples", 4, 1, 100000, "prompts"), false},
      {ParamSpec::integer("new_tokens", 32, 1, 4096, "tokens generated by dense and by the method, then compared"),
       false},
  };
}

Result<std::unique_ptr<Task>> make_perplexity(const TaskParams& params) {
  CorpusTask::Config config{"perplexity", TaskKind::Perplexity, "length", 0, int32_t(params.get_int("chunk"))};
  return std::unique_ptr<Task>(std::make_unique<CorpusTask>(std::move(config), params));
}

Result<std::unique_ptr<Task>> make_fidelity(const TaskParams& params) {
  CorpusTask::Config config{"fidelity", TaskKind::Fidelity, "prompt_tokens", int32_t(params.get_int("new_tokens")), 0};
  return std::unique_ptr<Task>(std::make_unique<CorpusTask>(std::move(config), params));
}

}  // namespace tasks

Result<std::vector<std::vector<int32_t>>> corpus_windows(const Tokenizer& tok, const std::string& corpus,
                                                         int64_t count, int64_t length, uint64_t seed) {
  if (count <= 0 || length < 2) return Error{fmt::format("corpus windows: {} windows of {} tokens", count, length)};
  tasks::Rng rng(seed);
  auto segments = tasks::corpus_segments(tok, corpus, count, length, rng);
  if (!segments) return segments.error();
  std::vector<std::vector<int32_t>> out;
  for (auto& s : *segments) out.push_back(std::move(s.tokens));
  return out;
}

}  // namespace inferlab
