// BPE behind the Tokenizer interface: byte-level (GPT-2 style) as GGUF files and
// most Hugging Face tokenizers have it, or over Unicode characters with byte
// fallback as Llama-2's and Mistral's tokenizer.json have it. Private to tokenizer/.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "inferlab/result.h"
#include "tokenizer/pre_tokenizer.h"
#include "tokenizer/tokenizer.h"

namespace inferlab::tokenizer_detail {

// One step of a Hugging Face normalizer, applied to each segment of text
// between added tokens (as HF does): Prepend to a non-empty segment, or
// Replace every occurrence of `text`.
struct TextRewrite {
  enum class Kind { Prepend, Replace } kind = Kind::Replace;
  std::string text;
  std::string replacement;  // Replace only
};

// Metaspace pre-tokenizer's prepend_scheme: "first" prepends only to the segment
// at the very start of the text (not to one that follows an added token).
enum class PrependScheme { Never, First, Always };

// What a GGUF vocabulary implies (the defaults) or a tokenizer.json spells out.
struct BpeOptions {
  // Token text spells bytes with GPT-2's symbols (byte_level_symbol); false:
  // token text is Unicode text and merges start from characters.
  bool byte_level = true;
  bool byte_fallback = false;  // a character not in the vocabulary -> its "<0xHH>" tokens
  bool fuse_unknown = false;   // consecutive unknown characters -> one unknown token
  std::vector<TextRewrite> normalize;
  // Metaspace pre-tokenizer: ' ' becomes `metaspace`, prepended per the scheme
  // unless the segment starts with it; with `metaspace_split` the segment is cut
  // before each one. Empty: no Metaspace.
  std::string metaspace;
  PrependScheme metaspace_prepend = PrependScheme::Never;
  bool metaspace_split = false;
  bool add_prefix_space = false;  // ByteLevel(add_prefix_space): ' ' before a segment lacking one
  // Decoding: `space_symbol` in token text reads as ' ' (Replace "▁" -> " "), and
  // decode() removes up to `strip_leading_spaces` spaces from the start of its
  // result (Strip decoder, after Fuse).
  std::string space_symbol;
  int strip_leading_spaces = 0;
  // How errors name the merge list (a GGUF key or a tokenizer.json key).
  std::string merges_key = "tokenizer.ggml.merges";
};

// `vocab.model` must already be "gpt2"; everything else is validated here.
Result<std::unique_ptr<Tokenizer>> make_bpe_tokenizer(TokenizerVocab vocab);
// The tokenizer.json path (hf_tokenizer.cpp): the pre-tokenizer and options given.
Result<std::unique_ptr<Tokenizer>> make_bpe_tokenizer(TokenizerVocab vocab, BpeOptions options,
                                                      PreTokenizer pre);

}  // namespace inferlab::tokenizer_detail
