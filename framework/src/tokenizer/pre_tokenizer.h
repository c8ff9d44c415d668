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
                                            std::string_view source);

  // Appends the pieces of `text` (views into it) to `pieces`.
  void split(std::string_view text, std::vector<std::string_view>& pieces) const;

  // Llama-3 style: a piece that is itself a vocabulary token skips the merges.
  bool ignore_merges() const { return ignore_merges_; }

 private:
  std::vector<std::shared_ptr<const SplitRegex>> regexes_;
  bool ignore_merges_ = false;
};

}  // namespace inferlab::tokenizer_detail
