// Regex pre-tokenization (PCRE2, Unicode-aware, JIT when available): the text is
// cut into pieces that BPE then encodes independently. Private to tokenizer/.
#pragma once

#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "inferlab/result.h"

namespace inferlab::tokenizer_detail {

class SplitRegex;

class PreTokenizer {
 public:
  // The regex sequence for a tokenizer.ggml.pre name; unknown names get GPT-2's
  // (see tokenizer.h). `source` names the file in errors.
  static Result<PreTokenizer> for_name(std::string_view pre, std::string_view source);
  // Each regex in turn splits every piece the previous one produced; matches and
  // the text between matches both become pieces ("isolated" splitting), so the
  // pieces always cover the input exactly.
  static Result<PreTokenizer> from_patterns(const std::vector<std::string>& patterns,
                                            std::string_view source, bool ignore_merges = false);

  // Appends the pieces of `text` (views into it) to `pieces`.
  void split(std::string_view text, std::vector<std::string_view>& pieces) const;

  // Llama-3 style: a piece that is itself a vocabulary token skips the merges.
  bool ignore_merges() const { return ignore_merges_; }

  // The patterns Hugging Face's pre-tokenizers use, in this file's PCRE2 spelling.
  static std::string gpt2_pattern();                  // ByteLevel(use_regex=true)
  static std::string digits_pattern(bool individual);  // Digits(individual_digits)
  // A tokenizer.json regex (Oniguruma syntax) as PCRE2 matches it the same way:
  // \s and \S become Unicode White_Space, as Oniguruma reads them. Constructs
  // that differ between the two engines are an error whose text the caller
  // prefixes with the file and key.
  static Result<std::string> from_oniguruma(std::string_view pattern);
  // `text` matched literally.
  static std::string literal(std::string_view text);

 private:
  std::vector<std::shared_ptr<const SplitRegex>> regexes_;
  bool ignore_merges_ = false;
};

}  // namespace inferlab::tokenizer_detail
