#include "tokenizer/bpe_tokenizer.h"

#include <algorithm>
#include <array>
#include <cstdint>
#include <queue>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

#include "tokenizer/pre_tokenizer.h"

namespace inferlab::tokenizer_detail {
namespace {

// ---- GPT-2 byte <-> code point mapping -------------------------------------
// Printable bytes stand for themselves; the other 68 bytes take the code points
// 256, 257, ... in byte order, so every token is printable text.

bool byte_is_printable(int b) {
  return (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF);
}

struct ByteLevelTables {
  std::array<char32_t, 256> byte_to_cp{};
  std::array<int16_t, 256 + 68> cp_to_byte{};  // -1: not a byte-level code point
  ByteLevelTables() {
    cp_to_byte.fill(-1);
    char32_t next = 256;
    for (int b = 0; b < 256; ++b) {
      char32_t cp = byte_is_printable(b) ? static_cast<char32_t>(b) : next++;
      byte_to_cp[b] = cp;
      cp_to_byte[cp] = static_cast<int16_t>(b);
    }
  }
};

const ByteLevelTables& byte_level() {
  static const ByteLevelTables tables;
  return tables;
}

void append_utf8(char32_t cp, std::string& out) {
  if (cp < 0x80) {
    out += static_cast<char>(cp);
  } else if (cp < 0x800) {
    out += static_cast<char>(0xC0 | (cp >> 6));
    out += static_cast<char>(0x80 | (cp & 0x3F));
  } else if (cp < 0x10000) {
    out += static_cast<char>(0xE0 | (cp >> 12));
    out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
    out += static_cast<char>(0x80 | (cp & 0x3F));
  } else {
    out += static_cast<char>(0xF0 | (cp >> 18));
    out += static_cast<char>(0x80 | ((cp >> 12) & 0x3F));
    out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
    out += static_cast<char>(0x80 | (cp & 0x3F));
  }
}

// Decodes one UTF-8 sequence at `pos` (advancing it). Returns -1 and advances one
// byte on an invalid or truncated sequence.
int32_t next_code_point(std::string_view s, size_t& pos) {
  auto byte = [&](size_t i) { return static_cast<uint8_t>(s[i]); };
  uint8_t lead = byte(pos);
  size_t len = lead < 0x80 ? 1 : (lead >> 5) == 6 ? 2 : (lead >> 4) == 14 ? 3 : (lead >> 3) == 30 ? 4 : 0;
  if (len == 0 || pos + len > s.size()) {
    ++pos;
    return -1;
  }
  int32_t cp = len == 1 ? lead : lead & (0x7F >> len);
  for (size_t i = 1; i < len; ++i) {
    if ((byte(pos + i) & 0xC0) != 0x80) {
      ++pos;
      return -1;
    }
    cp = (cp << 6) | (byte(pos + i) & 0x3F);
  }
  pos += len;
  return cp;
}

std::string byte_level_encode(std::string_view bytes) {
  std::string out;
  out.reserve(bytes.size() * 2);
  for (char c : bytes) append_utf8(byte_level().byte_to_cp[static_cast<uint8_t>(c)], out);
  return out;
}

// Token text back to bytes; code points outside the mapping pass through as UTF-8.
std::string byte_level_decode(std::string_view text) {
  std::string out;
  const auto& table = byte_level().cp_to_byte;
  for (size_t pos = 0; pos < text.size();) {
    size_t start = pos;
    int32_t cp = next_code_point(text, pos);
    if (cp >= 0 && static_cast<size_t>(cp) < table.size() && table[cp] >= 0) {
      out += static_cast<char>(table[cp]);
    } else {
      out.append(text.substr(start, pos - start));
    }
  }
  return out;
}

// "<0xHH>" -> the byte, else -1.
int parse_byte_token(std::string_view text) {
  if (text.size() != 6 || text.substr(0, 3) != "<0x" || text[5] != '>') return -1;
  int value = 0;
  for (char c : text.substr(3, 2)) {
    int digit = (c >= '0' && c <= '9') ? c - '0'
              : (c >= 'A' && c <= 'F') ? c - 'A' + 10
              : (c >= 'a' && c <= 'f') ? c - 'a' + 10 : -1;
    if (digit < 0) return -1;
    value = value * 16 + digit;
  }
  return value;
}

uint64_t pair_key(TokenId left, TokenId right) {
  return (static_cast<uint64_t>(static_cast<uint32_t>(left)) << 32) | static_cast<uint32_t>(right);
}

// ---- special tokens in raw text ----------------------------------------------

// Finds the longest token text starting at a position (leftmost-longest, as HF's
// added-token matcher does).
class SpecialMatcher {
 public:
  void add(TokenId id, std::string_view text) {
    if (text.empty()) return;
    by_first_byte_[static_cast<uint8_t>(text[0])].emplace_back(text, id);
  }
  void finish() {
    for (auto& list : by_first_byte_) {
      std::stable_sort(list.begin(), list.end(), [](const auto& a, const auto& b) {
        return a.first.size() > b.first.size();
      });
    }
  }
  // The token starting at `pos` and its length, or {-1, 0}.
  std::pair<TokenId, size_t> match_at(std::string_view text, size_t pos) const {
    for (const auto& [candidate, id] : by_first_byte_[static_cast<uint8_t>(text[pos])]) {
      if (text.compare(pos, candidate.size(), candidate) == 0) return {id, candidate.size()};
    }
    return {-1, 0};
  }
  bool may_start(char c) const { return !by_first_byte_[static_cast<uint8_t>(c)].empty(); }

 private:
  std::array<std::vector<std::pair<std::string_view, TokenId>>, 256> by_first_byte_;
};

// ---- the tokenizer -------------------------------------------------------------

struct MergeResult {
  int32_t rank;
  TokenId merged;
};

// "<0xHH>" as Hugging Face's byte_fallback spells it (upper-case hex digits).
std::string byte_fallback_token(uint8_t byte) {
  static const char* const kHex = "0123456789ABCDEF";
  return std::string("<0x") + kHex[byte >> 4] + kHex[byte & 15] + ">";
}

void replace_all(std::string& text, std::string_view from, std::string_view to) {
  if (from.empty()) return;
  std::string out;
  size_t start = 0;
  for (size_t at = text.find(from); at != std::string::npos; at = text.find(from, start)) {
    out.append(text, start, at - start);
    out.append(to);
    start = at + from.size();
  }
  if (start == 0) return;  // nothing replaced
  out.append(text, start, std::string::npos);
  text = std::move(out);
}

class BpeTokenizer final : public Tokenizer {
 public:
  BpeTokenizer(TokenizerVocab vocab, BpeOptions options, PreTokenizer pre)
      : vocab_(std::move(vocab)), options_(std::move(options)), pre_(std::move(pre)) {}

  Status build();

  std::vector<TokenId> encode(std::string_view text, bool add_bos,
                              bool parse_special) const override;
  std::string decode(const std::vector<TokenId>& tokens) const override {
    std::string out;
    for (TokenId t : tokens) {
      if (t >= 0 && t < vocab_size()) out += pieces_[t];
    }
    // The space that a Prepend normalizer or Metaspace added before the text.
    size_t strip = 0;
    while (strip < out.size() && static_cast<int>(strip) < options_.strip_leading_spaces &&
           out[strip] == ' ') {
      ++strip;
    }
    return out.erase(0, strip);
  }
  std::string token_to_piece(TokenId token) const override {
    return token >= 0 && token < vocab_size() ? pieces_[token] : std::string();
  }
  int32_t vocab_size() const override { return static_cast<int32_t>(vocab_.tokens.size()); }
  TokenId bos() const override { return vocab_.bos; }
  TokenId eos() const override { return vocab_.eos; }
  bool add_bos_default() const override { return vocab_.add_bos; }
  bool is_special(TokenId token) const override {
    if (token < 0 || token >= vocab_size()) return false;
    TokenType type = type_of(token);
    return type == TokenType::Control || type == TokenType::Unknown || token == vocab_.bos ||
           token == vocab_.eos;
  }

 private:
  // Scratch buffers reused across the pieces of one encode() call.
  struct Symbol {
    TokenId id;
    int32_t prev, next;  // neighbours in the current segmentation; -1 at the ends
  };
  struct Candidate {
    int32_t rank, left;         // merge rank; position of the left symbol
    TokenId left_id, right_id;  // the pair when queued (stale if either changed)
    TokenId merged;
    bool operator>(const Candidate& o) const {
      return rank != o.rank ? rank > o.rank : left > o.left;
    }
  };
  struct Scratch {
    std::string text;  // a segment after the normalizer; `pieces` may view it
    std::vector<std::string_view> pieces;
    std::vector<TokenId> initial;  // a piece's symbols before merging
    std::vector<Symbol> symbols;
    std::vector<Candidate> heap;
  };

  TokenType type_of(TokenId id) const {
    return vocab_.types.empty() ? TokenType::Normal : vocab_.types[id];
  }
  Status validate() const;
  Status build_merges();
  void encode_ordinary(std::string_view text, bool at_start, Scratch& scratch,
                       std::vector<TokenId>& out) const;
  std::string_view normalize(std::string_view text, bool at_start, Scratch& scratch) const;
  void initial_symbols(std::string_view piece, std::vector<TokenId>& ids) const;
  void encode_piece(std::string_view piece, Scratch& scratch, std::vector<TokenId>& out) const;
  void queue_pair(Scratch& scratch, int32_t left) const;

  TokenizerVocab vocab_;
  BpeOptions options_;
  PreTokenizer pre_;
  std::unordered_map<std::string_view, TokenId> token_ids_;  // views into vocab_.tokens
  std::unordered_map<uint64_t, MergeResult> merges_;          // pair_key -> merge
  // Byte-level: each byte's symbol; else the "<0xHH>" tokens (byte_fallback). -1: missing.
  std::array<TokenId, 256> byte_tokens_{};
  // Stands for a byte (or, not byte-level, a character) with no token: the
  // unknown token if it really is one (type Unknown), else -1 and the byte is
  // dropped, as HF's BPE does without an unk_token. (SmolLM2 lacks 21 byte
  // symbols and names <|endoftext|> unknown.)
  TokenId missing_byte_token_ = -1;
  std::vector<std::string> pieces_;                          // bytes of each token
  SpecialMatcher user_defined_;  // matched always
  SpecialMatcher special_;       // matched with parse_special (includes user-defined)
};

Status BpeTokenizer::validate() const {
  const std::string& src = vocab_.source;
  const auto n_tokens = static_cast<int64_t>(vocab_.tokens.size());
  if (n_tokens == 0) return Error{src + ": tokenizer.ggml.tokens is empty"};
  if (n_tokens > INT32_MAX) return Error{src + ": tokenizer.ggml.tokens has too many entries"};
  if (!vocab_.types.empty() && static_cast<int64_t>(vocab_.types.size()) != n_tokens) {
    return Error{src + ": tokenizer.ggml.token_type has " + std::to_string(vocab_.types.size()) +
                 " entries but tokenizer.ggml.tokens has " + std::to_string(n_tokens)};
  }
  for (size_t i = 0; i < vocab_.types.size(); ++i) {
    auto t = static_cast<int32_t>(vocab_.types[i]);
    if (t < 0 || t > static_cast<int32_t>(TokenType::Byte)) {
      return Error{src + ": tokenizer.ggml.token_type[" + std::to_string(i) + "] = " +
                   std::to_string(t) + " is not a token type (0..6)"};
    }
  }
  const std::pair<const char*, TokenId> ids[] = {
      {"bos_token_id", vocab_.bos}, {"eos_token_id", vocab_.eos},
      {"unknown_token_id", vocab_.unknown}, {"padding_token_id", vocab_.padding}};
  for (const auto& [key, id] : ids) {
    if (id < -1 || id >= n_tokens) {
      return Error{src + ": tokenizer.ggml." + key + " = " + std::to_string(id) +
                   " is out of range (the vocabulary has " + std::to_string(n_tokens) +
                   " tokens)"};
    }
  }
  return ok_status();
}

Status BpeTokenizer::build() {
  if (Status valid = validate(); !valid) return valid;
  const auto n_tokens = static_cast<TokenId>(vocab_.tokens.size());
  token_ids_.reserve(vocab_.tokens.size());
  pieces_.reserve(vocab_.tokens.size());
  for (TokenId id = 0; id < n_tokens; ++id) {
    const std::string& text = vocab_.tokens[id];
    token_ids_.emplace(text, id);  // a duplicate keeps its first id
    TokenType type = type_of(id);
    int byte = type == TokenType::Byte ? parse_byte_token(text) : -1;
    if (byte >= 0) {
      pieces_.emplace_back(1, static_cast<char>(byte));
    } else if (type == TokenType::Control || type == TokenType::UserDefined) {
      pieces_.push_back(text);  // stored raw, not byte-level mapped
    } else if (options_.byte_level) {
      pieces_.push_back(byte_level_decode(text));
    } else {
      pieces_.push_back(text);
      replace_all(pieces_.back(), options_.space_symbol, " ");
    }
    if (type == TokenType::UserDefined) user_defined_.add(id, text);
    if (type == TokenType::UserDefined || type == TokenType::Control ||
        type == TokenType::Unknown) {
      special_.add(id, text);
    }
  }
  user_defined_.finish();
  special_.finish();

  for (int b = 0; b < 256; ++b) {
    byte_tokens_[b] = -1;
    if (!options_.byte_level && !options_.byte_fallback) continue;
    auto it = token_ids_.find(options_.byte_level ? byte_level_symbol(static_cast<uint8_t>(b))
                                                  : byte_fallback_token(static_cast<uint8_t>(b)));
    if (it != token_ids_.end()) byte_tokens_[b] = it->second;
  }
  if (vocab_.unknown >= 0 && type_of(vocab_.unknown) == TokenType::Unknown) {
    missing_byte_token_ = vocab_.unknown;
  }
  return build_merges();
}

Status BpeTokenizer::build_merges() {
  merges_.reserve(vocab_.merges.size());
  for (size_t rank = 0; rank < vocab_.merges.size(); ++rank) {
    std::string_view merge = vocab_.merges[rank];
    auto fail = [&](const std::string& why) {
      return Error{vocab_.source + ": " + options_.merges_key + "[" + std::to_string(rank) + "] '" +
                   std::string(merge) + "' " + why};
    };
    size_t space = merge.find(' ');
    if (space == std::string_view::npos || space == 0 || space + 1 == merge.size()) {
      return fail("is not two tokens separated by a space");
    }
    std::string_view left = merge.substr(0, space), right = merge.substr(space + 1);
    auto l = token_ids_.find(left), r = token_ids_.find(right);
    std::string joined = std::string(left) + std::string(right);
    auto m = token_ids_.find(joined);
    if (l == token_ids_.end()) return fail("names '" + std::string(left) + "', not in the vocabulary");
    if (r == token_ids_.end()) return fail("names '" + std::string(right) + "', not in the vocabulary");
    if (m == token_ids_.end()) return fail("makes '" + joined + "', not in the vocabulary");
    // A repeated pair keeps its first (best) rank.
    merges_.emplace(pair_key(l->second, r->second),
                    MergeResult{static_cast<int32_t>(rank), m->second});
  }
  return ok_status();
}

std::vector<TokenId> BpeTokenizer::encode(std::string_view text, bool add_bos,
                                          bool parse_special) const {
  std::vector<TokenId> out;
  out.reserve(text.size() / 3 + 2);
  if (add_bos && vocab_.bos >= 0) out.push_back(vocab_.bos);
  const SpecialMatcher& matcher = parse_special ? special_ : user_defined_;
  Scratch scratch;
  size_t segment = 0;
  for (size_t pos = 0; pos < text.size();) {
    if (!matcher.may_start(text[pos])) {
      ++pos;
      continue;
    }
    auto [id, length] = matcher.match_at(text, pos);
    if (id < 0) {
      ++pos;
      continue;
    }
    encode_ordinary(text.substr(segment, pos - segment), segment == 0, scratch, out);
    out.push_back(id);
    pos += length;
    segment = pos;
  }
  encode_ordinary(text.substr(segment), segment == 0, scratch, out);
  return out;
}

// The segment after the normalizer and the text-changing part of the
// pre-tokenizer (Metaspace, ByteLevel's prefix space); a view of `text` itself
// when there are none.
std::string_view BpeTokenizer::normalize(std::string_view text, bool at_start,
                                         Scratch& scratch) const {
  const bool rewrites = !options_.normalize.empty() || !options_.metaspace.empty() ||
                        options_.add_prefix_space;
  if (!rewrites) return text;
  std::string& s = scratch.text;
  s.assign(text);
  for (const TextRewrite& step : options_.normalize) {
    if (step.kind == TextRewrite::Kind::Prepend) {
      if (!s.empty()) s.insert(0, step.text);
    } else {
      replace_all(s, step.text, step.replacement);
    }
  }
  const std::string& meta = options_.metaspace;
  if (!meta.empty()) {
    replace_all(s, " ", meta);
    const bool prepend = options_.metaspace_prepend == PrependScheme::Always ||
                         (options_.metaspace_prepend == PrependScheme::First && at_start);
    if (prepend && s.compare(0, meta.size(), meta) != 0) s.insert(0, meta);
  }
  if (options_.add_prefix_space && (s.empty() || s[0] != ' ')) s.insert(0, " ");
  return s;
}

void BpeTokenizer::encode_ordinary(std::string_view text, bool at_start, Scratch& scratch,
                                   std::vector<TokenId>& out) const {
  if (text.empty()) return;
  std::string_view normalized = normalize(text, at_start, scratch);
  scratch.pieces.clear();
  if (options_.metaspace_split) {
    // Metaspace(split=true): each metaspace starts a new piece (merged with the next).
    const std::string& meta = options_.metaspace;
    size_t start = 0;
    // From byte 1: a metaspace at 0 starts the first piece, and none can start
    // inside a character (UTF-8 lead bytes never look like continuation bytes).
    for (size_t at = normalized.find(meta, 1); at != std::string_view::npos;
         at = normalized.find(meta, at + meta.size())) {
      if (at > start) pre_.split(normalized.substr(start, at - start), scratch.pieces);
      start = at;
    }
    pre_.split(normalized.substr(start), scratch.pieces);
  } else {
    pre_.split(normalized, scratch.pieces);
  }
  for (std::string_view piece : scratch.pieces) encode_piece(piece, scratch, out);
}

// A piece's symbols before merging. Byte-level: one per byte (-1 for a byte the
// vocabulary lacks). Otherwise one per UTF-8 character in the vocabulary; a
// character that is not becomes its "<0xHH>" tokens with byte_fallback, else the
// unknown token (consecutive ones fused with fuse_unk) if there is one of type
// Unknown, else nothing, as
// Hugging Face's BPE does. Invalid UTF-8 goes byte by byte.
void BpeTokenizer::initial_symbols(std::string_view piece, std::vector<TokenId>& ids) const {
  ids.clear();
  if (options_.byte_level) {
    for (char c : piece) ids.push_back(byte_tokens_[static_cast<uint8_t>(c)]);
    return;
  }
  bool last_unknown = false;
  for (size_t pos = 0; pos < piece.size();) {
    const size_t start = pos;
    (void)next_code_point(piece, pos);
    const std::string_view character = piece.substr(start, pos - start);
    if (auto it = token_ids_.find(character); it != token_ids_.end()) {
      ids.push_back(it->second);
      last_unknown = false;
      continue;
    }
    bool have_bytes = options_.byte_fallback;
    for (char c : character) have_bytes = have_bytes && byte_tokens_[static_cast<uint8_t>(c)] >= 0;
    if (have_bytes) {
      for (char c : character) ids.push_back(byte_tokens_[static_cast<uint8_t>(c)]);
      continue;
    }
    if (missing_byte_token_ < 0) continue;
    if (!(options_.fuse_unknown && last_unknown)) ids.push_back(missing_byte_token_);
    last_unknown = true;
  }
}

void BpeTokenizer::queue_pair(Scratch& scratch, int32_t left) const {
  int32_t right = scratch.symbols[left].next;
  if (right < 0) return;
  TokenId a = scratch.symbols[left].id, b = scratch.symbols[right].id;
  if (a < 0 || b < 0) return;
  auto it = merges_.find(pair_key(a, b));
  if (it == merges_.end()) return;
  scratch.heap.push_back(Candidate{it->second.rank, left, a, b, it->second.merged});
  std::push_heap(scratch.heap.begin(), scratch.heap.end(), std::greater<>());
}

// Standard BPE: repeatedly merge the adjacent pair with the lowest rank (the
// leftmost one on ties). A min-heap with lazy invalidation keeps this
// O(n log n) even for very long pieces such as runs of spaces.
void BpeTokenizer::encode_piece(std::string_view piece, Scratch& scratch,
                                std::vector<TokenId>& out) const {
  auto emit = [&](TokenId id) {
    if (id >= 0) {
      out.push_back(id);
    } else if (missing_byte_token_ >= 0) {
      out.push_back(missing_byte_token_);
    }
  };
  if (pre_.ignore_merges()) {
    auto it = options_.byte_level ? token_ids_.find(byte_level_encode(piece)) : token_ids_.find(piece);
    if (it != token_ids_.end()) return emit(it->second);
  }
  if (options_.byte_level && piece.size() == 1) {
    return emit(byte_tokens_[static_cast<uint8_t>(piece[0])]);
  }

  initial_symbols(piece, scratch.initial);
  auto& symbols = scratch.symbols;
  symbols.clear();
  const auto n = static_cast<int32_t>(scratch.initial.size());
  if (n == 0) return;
  for (int32_t i = 0; i < n; ++i) {
    symbols.push_back(Symbol{scratch.initial[i], i - 1, i + 1 < n ? i + 1 : -1});
  }
  scratch.heap.clear();
  for (int32_t i = 0; i + 1 < n; ++i) queue_pair(scratch, i);

  while (!scratch.heap.empty()) {
    std::pop_heap(scratch.heap.begin(), scratch.heap.end(), std::greater<>());
    Candidate top = scratch.heap.back();
    scratch.heap.pop_back();
    Symbol& left = symbols[top.left];
    // Stale: the left symbol was merged away or changed, or its right neighbour did.
    if (left.id != top.left_id || left.next < 0 || symbols[left.next].id != top.right_id) continue;
    Symbol& right = symbols[left.next];
    left.id = top.merged;
    right.id = -2;  // removed; -2 never equals a queued id
    left.next = right.next;
    if (right.next >= 0) symbols[right.next].prev = top.left;
    if (left.prev >= 0) queue_pair(scratch, left.prev);
    queue_pair(scratch, top.left);
  }
  for (int32_t i = 0; i >= 0; i = symbols[i].next) emit(symbols[i].id);
}

}  // namespace

Result<std::unique_ptr<Tokenizer>> make_bpe_tokenizer(TokenizerVocab vocab) {
  auto pre = PreTokenizer::for_name(vocab.pre, vocab.source);
  if (!pre) return pre.error();
  return make_bpe_tokenizer(std::move(vocab), BpeOptions{}, std::move(pre.value()));
}

Result<std::unique_ptr<Tokenizer>> make_bpe_tokenizer(TokenizerVocab vocab, BpeOptions options,
                                                      PreTokenizer pre) {
  auto tokenizer =
      std::make_unique<BpeTokenizer>(std::move(vocab), std::move(options), std::move(pre));
  if (Status built = tokenizer->build(); !built) return built.error();
  return std::unique_ptr<Tokenizer>(std::move(tokenizer));
}

}  // namespace inferlab::tokenizer_detail

namespace inferlab {

std::string byte_level_symbol(uint8_t byte) {
  std::string out;
  tokenizer_detail::append_utf8(tokenizer_detail::byte_level().byte_to_cp[byte], out);
  return out;
}

}  // namespace inferlab
