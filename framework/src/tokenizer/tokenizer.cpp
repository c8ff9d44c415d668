#include "tokenizer/tokenizer.h"

#include <string>
#include <utility>

#include "tokenizer/bpe_tokenizer.h"
#include "tokenizer/try_result.h"

namespace inferlab {
namespace {

Error unsupported_model(const TokenizerVocab& vocab) {
  return Error{vocab.source + ": unsupported tokenizer model '" + vocab.model +
               "' (tokenizer.ggml.model); supported: gpt2 (byte-level BPE)"};
}

// Reads tokenizer.ggml.* keys; every error names the file and the key.
class VocabReader {
 public:
  explicit VocabReader(const gguf::File& file) : file_(file), path_(file.path().string()) {}

  Error missing(std::string_view key, std::string_view type) const {
    return Error{path_ + ": missing " + std::string(key) + " (" + std::string(type) +
                 "); is this a model file with a tokenizer?"};
  }
  Error ill_typed(std::string_view key, std::string_view type) const {
    return Error{path_ + ": " + std::string(key) + " is not " + std::string(type)};
  }

  Result<std::string> string(std::string_view key, const char* fallback = nullptr) const {
    if (file_.find(key) == nullptr) {
      if (fallback != nullptr) return std::string(fallback);
      return missing(key, "a string");
    }
    auto value = file_.get_string(key);
    if (!value) return ill_typed(key, "a string");
    return *value;
  }
  Result<std::vector<std::string>> strings(std::string_view key, bool required) const {
    if (file_.find(key) == nullptr) {
      if (!required) return std::vector<std::string>{};
      return missing(key, "an array of strings");
    }
    auto value = file_.get_string_array(key);
    if (!value) return ill_typed(key, "an array of strings");
    return std::move(*value);
  }
  Result<std::vector<int64_t>> ints(std::string_view key) const {
    if (file_.find(key) == nullptr) return std::vector<int64_t>{};
    auto value = file_.get_int_array(key);
    if (!value) return ill_typed(key, "an array of integers");
    return std::move(*value);
  }
  // Absent: -1. Present: must be an integer id in [0, n_tokens).
  Result<TokenId> token_id(std::string_view key, size_t n_tokens) const {
    if (file_.find(key) == nullptr) return TokenId{-1};
    auto value = file_.get_int(key);
    if (!value) return ill_typed(key, "an integer token id");
    if (*value < 0 || static_cast<uint64_t>(*value) >= n_tokens) {
      return Error{path_ + ": " + std::string(key) + " = " + std::to_string(*value) +
                   " is out of range (the vocabulary has " + std::to_string(n_tokens) +
                   " tokens)"};
    }
    return static_cast<TokenId>(*value);
  }
  Result<bool> flag(std::string_view key, bool fallback) const {
    if (file_.find(key) == nullptr) return fallback;
    auto value = file_.get_bool(key);
    if (!value) return ill_typed(key, "a bool");
    return *value;
  }

  const std::string& path() const { return path_; }

 private:
  const gguf::File& file_;
  std::string path_;
};

Result<TokenizerVocab> read_vocab(const gguf::File& file) {
  VocabReader reader(file);
  TokenizerVocab vocab;
  vocab.source = reader.path();
  INFERLAB_TRY_ASSIGN(vocab.model, reader.string("tokenizer.ggml.model"));
  // Before the other keys: a vocabulary of another kind would fail on them first.
  if (vocab.model != "gpt2") return unsupported_model(vocab);
  INFERLAB_TRY_ASSIGN(vocab.pre, reader.string("tokenizer.ggml.pre", "default"));
  INFERLAB_TRY_ASSIGN(vocab.tokens, reader.strings("tokenizer.ggml.tokens", true));
  INFERLAB_TRY_ASSIGN(vocab.merges, reader.strings("tokenizer.ggml.merges", true));

  std::vector<int64_t> types;
  INFERLAB_TRY_ASSIGN(types, reader.ints("tokenizer.ggml.token_type"));
  vocab.types.reserve(types.size());  // its length is checked with the rest
  for (size_t i = 0; i < types.size(); ++i) {
    if (types[i] < 0 || types[i] > static_cast<int64_t>(TokenType::Byte)) {
      return Error{reader.path() + ": tokenizer.ggml.token_type[" + std::to_string(i) +
                   "] = " + std::to_string(types[i]) + " is not a token type (0..6)"};
    }
    vocab.types.push_back(static_cast<TokenType>(types[i]));
  }

  const size_t n = vocab.tokens.size();
  INFERLAB_TRY_ASSIGN(vocab.bos, reader.token_id("tokenizer.ggml.bos_token_id", n));
  INFERLAB_TRY_ASSIGN(vocab.eos, reader.token_id("tokenizer.ggml.eos_token_id", n));
  INFERLAB_TRY_ASSIGN(vocab.unknown, reader.token_id("tokenizer.ggml.unknown_token_id", n));
  INFERLAB_TRY_ASSIGN(vocab.padding, reader.token_id("tokenizer.ggml.padding_token_id", n));
  INFERLAB_TRY_ASSIGN(vocab.add_bos, reader.flag("tokenizer.ggml.add_bos_token", false));
  return vocab;
}

#undef INFERLAB_TRY_ASSIGN

}  // namespace

Result<std::unique_ptr<Tokenizer>> Tokenizer::from_gguf(const gguf::File& file) {
  auto vocab = read_vocab(file);
  if (!vocab) return vocab.error();
  return from_vocab(std::move(vocab.value()));
}

Result<std::unique_ptr<Tokenizer>> Tokenizer::from_vocab(TokenizerVocab vocab) {
  if (vocab.model != "gpt2") return unsupported_model(vocab);
  return tokenizer_detail::make_bpe_tokenizer(std::move(vocab));
}

}  // namespace inferlab
