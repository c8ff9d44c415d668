// Tokenizer built from the vocabulary stored in a GGUF file, or from a Hugging
// Face tokenizer.json (from_hf; what it supports is listed there).
// GGUF: byte-level BPE with merges (tokenizer.ggml.model = "gpt2"), with the
// pre-tokenizer chosen by tokenizer.ggml.pre, and special/control tokens.
//
// Pre-tokenizers by tokenizer.ggml.pre (the regexes llama.cpp and HF use):
//   "smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva-7b":
//        every \p{N} is its own piece, then the GPT-2 pattern
//   "llama3", "llama-v3", "llama-bpe": the Llama-3 pattern (and a piece that is
//        itself a vocabulary token is emitted whole, before merges)
//   "default", "gpt2", "gpt-2", "mpt", "olmo", "phi-2", and any name not listed:
//        the GPT-2 pattern. An unknown name is NOT an error: it falls back to
//        GPT-2, which is right for many vocabularies and close for most others.
#pragma once

#include <cstdint>
#include <filesystem>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "gguf/gguf.h"
#include "inferlab/result.h"

namespace inferlab {

using TokenId = int32_t;

// tokenizer.ggml.token_type values (llama.cpp's numbering; do not renumber).
enum class TokenType : int32_t {
  Undefined = 0,    // treated as Normal
  Normal = 1,
  Unknown = 2,
  Control = 3,      // <|im_start|> etc.: matched in text only with parse_special
  UserDefined = 4,  // always matched in text, rendered as its raw text
  Unused = 5,
  Byte = 6,         // "<0xHH>"
};

// Everything a tokenizer is built from: what from_gguf reads out of the file.
// Tests and tools may fill it directly.
struct TokenizerVocab {
  std::string source = "<memory>";  // named in error messages (the GGUF path)
  std::string model = "gpt2";       // tokenizer.ggml.model
  std::string pre = "default";      // tokenizer.ggml.pre
  std::vector<std::string> tokens;  // byte-level text (GPT-2 bytes_to_unicode)
  std::vector<TokenType> types;     // empty: all Normal; else one per token
  std::vector<std::string> merges;  // "left right"; rank = index
  TokenId bos = -1, eos = -1, unknown = -1, padding = -1;  // -1: none
  bool add_bos = false;
};

// GPT-2's printable stand-in for a byte (bytes_to_unicode), as UTF-8: how a
// byte-level vocabulary spells the byte, e.g. ' ' -> "Ġ", '\n' -> "Ċ".
std::string byte_level_symbol(uint8_t byte);

class Tokenizer {
 public:
  static Result<std::unique_ptr<Tokenizer>> from_gguf(const gguf::File& file);
  // Validates the vocabulary (ids in range, merges resolvable) first.
  static Result<std::unique_ptr<Tokenizer>> from_vocab(TokenizerVocab vocab);
  // A Hugging Face tokenizer folder's tokenizer.json (and tokenizer_config.json when present).
  //
  // Supported (anything else is an error naming the file and the JSON key):
  //  - model BPE (merges as "a b" strings or [a, b] pairs; ignore_merges, byte_fallback,
  //    fuse_unk, unk_token), either
  //    byte-level: pre_tokenizer ByteLevel, alone (use_regex: the GPT-2 pattern) or last in
  //      a Sequence after Split (Regex or String pattern, behavior Isolated) and Digits
  //      steps (Llama-3, Qwen2, SmolLM); decoder ByteLevel;
  //    or over Unicode characters (Llama-2, Mistral): normalizer Prepend / Replace, or
  //      pre_tokenizer Metaspace; decoder Replace("▁" -> " "), ByteFallback, Fuse, Strip
  //      (leading spaces), or Metaspace.
  //  - normalizer NFC is accepted but NOT applied (no Unicode normalization tables
  //    here): text that is not already NFC, e.g. decomposed accents, may encode
  //    differently from Hugging Face. Qwen2 declares it.
  //  - added_tokens: special ones are Control tokens (matched with parse_special),
  //    the others UserDefined (always matched). Their lstrip, rstrip, single_word
  //    and normalized flags are ignored: every added token is matched in the raw
  //    text, which is what they mean for the tokenizers above (all false, or
  //    `normalized` on a tokenizer without a normalizer).
  //  - post_processor: ByteLevel, TemplateProcessing whose `single` is "$A" or
  //    "<bos> $A", or a Sequence of those.
  //  - BOS/EOS/unk/pad from tokenizer_config.json's bos_token, eos_token, unk_token,
  //    pad_token (a string or {"content": ...}); add_bos_token from there too, else
  //    true when the template starts with a special token (which is then BOS).
  //    Without tokenizer_config.json there is no EOS. add_eos_token true is an error.
  //  - truncation and padding are ignored (they shape batches, not one text's ids).
  // Ids must be dense: the vocabulary size is the largest id + 1 over model.vocab and
  // added_tokens. decode() returns bytes; where Hugging Face would replace an
  // invalid UTF-8 byte run with U+FFFD, this keeps the bytes.
  static Result<std::unique_ptr<Tokenizer>> from_hf(const std::filesystem::path& tokenizer_json);
  virtual ~Tokenizer() = default;

  // `parse_special`: text like "<|im_start|>" maps to its special token instead of
  // being split into ordinary pieces. `add_bos` prepends BOS when the model has one.
  // User-defined tokens are matched whatever `parse_special` says (as in HF and
  // llama.cpp). Any bytes are accepted; invalid UTF-8 is encoded byte by byte.
  // A byte whose symbol the vocabulary lacks becomes the unknown token if that
  // has type Unknown, else it is dropped as HF does (SmolLM2 lacks 0x04 0x06
  // 0x13 0x14 0x16 0x1D 0xC0 0xC1 0xF5-0xFF), so such text cannot round-trip.
  virtual std::vector<TokenId> encode(std::string_view text, bool add_bos,
                                      bool parse_special) const = 0;
  // Concatenated bytes of the tokens (special tokens rendered as their text;
  // ids out of range render as nothing).
  virtual std::string decode(const std::vector<TokenId>& tokens) const = 0;
  // Bytes of one token; streaming callers must buffer incomplete UTF-8 themselves.
  virtual std::string token_to_piece(TokenId token) const = 0;

  virtual int32_t vocab_size() const = 0;
  virtual TokenId bos() const = 0;  // -1 when none
  virtual TokenId eos() const = 0;  // -1 when none
  virtual bool add_bos_default() const = 0;  // tokenizer.ggml.add_bos_token
  // Control and unknown tokens, BOS and EOS: not text a user wrote.
  virtual bool is_special(TokenId token) const = 0;
};

}  // namespace inferlab
