#include "tokenizer/pre_tokenizer.h"

#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>

#include <array>
#include <cctype>
#include <utility>

namespace inferlab::tokenizer_detail {
namespace {

// `\s` spelled out as Unicode White_Space, which is what HF tokenizers' regex
// engine (Oniguruma) matches; PCRE2's \s also takes U+180E MONGOLIAN VOWEL
// SEPARATOR and would split differently there.
#define WS R"(\t-\r\x{20}\x{85}\x{A0}\x{1680}\x{2000}-\x{200A}\x{2028}\x{2029}\x{202F}\x{205F}\x{3000})"

// GPT-2 / HF ByteLevel:
//   's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
// The final `\s+` (absent from llama.cpp's copy) only matters for whitespace the
// other branches leave unmatched; with isolated splitting both give the same pieces.
constexpr const char* kGpt2Pattern =
    R"('s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^)" WS R"(\p{L}\p{N}]+)"
    R"(|[)" WS R"(]+(?![^)" WS R"(])|[)" WS R"(]+)";
// Llama 3:
//   (?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}
//   | ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+
constexpr const char* kLlama3Pattern =
    R"((?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3})"
    R"(| ?[^)" WS R"(\p{L}\p{N}]+[\r\n]*|[)" WS R"(]*[\r\n]+)"
    R"(|[)" WS R"(]+(?![^)" WS R"(])|[)" WS R"(]+)";
// HF Digits(individual_digits=true): every numeric character alone.
constexpr const char* kEachDigitPattern = R"(\p{N})";
// Oniguruma's \s and \S (see WS), inside and outside a character class.
constexpr const char* kSpaceClassBody = WS;
constexpr const char* kSpaceClass = "[" WS "]";
constexpr const char* kNonSpaceClass = "[^" WS "]";
#undef WS

bool name_in(std::string_view name, std::initializer_list<std::string_view> names) {
  for (std::string_view n : names) {
    if (n == name) return true;
  }
  return false;
}

std::string pcre2_message(int code) {
  std::array<PCRE2_UCHAR, 256> buffer{};
  pcre2_get_error_message(code, buffer.data(), buffer.size());
  return reinterpret_cast<const char*>(buffer.data());
}

}  // namespace

// One compiled pattern. pcre2_code is read-only after compilation, so one
// instance serves every thread; match data is per call.
class SplitRegex {
 public:
  static Result<std::shared_ptr<const SplitRegex>> compile(const std::string& pattern,
                                                           std::string_view source) {
    int error = 0;
    PCRE2_SIZE error_offset = 0;
    // MATCH_INVALID_UTF: invalid UTF-8 never matches (it ends up in the pieces
    // between matches) instead of failing the whole match.
    pcre2_code* code = pcre2_compile(
        reinterpret_cast<PCRE2_SPTR>(pattern.data()), pattern.size(),
        PCRE2_UTF | PCRE2_UCP | PCRE2_MATCH_INVALID_UTF, &error, &error_offset, nullptr);
    if (code == nullptr) {
      return Error{std::string(source) + ": pre-tokenizer regex '" + pattern +
                   "' does not compile at offset " + std::to_string(error_offset) + ": " +
                   pcre2_message(error)};
    }
    auto regex = std::shared_ptr<SplitRegex>(new SplitRegex(code));
    // JIT is an optimisation only: without it pcre2_match interprets.
    (void)pcre2_jit_compile(code, PCRE2_JIT_COMPLETE);
    return std::shared_ptr<const SplitRegex>(std::move(regex));
  }
  ~SplitRegex() { pcre2_code_free(code_); }
  SplitRegex(const SplitRegex&) = delete;
  SplitRegex& operator=(const SplitRegex&) = delete;

  // Appends matches and the gaps between them, in order, to `out`.
  void split(std::string_view text, pcre2_match_data* match,
             std::vector<std::string_view>& out) const {
    const auto* subject = reinterpret_cast<PCRE2_SPTR>(text.data());
    size_t gap_start = 0;
    size_t pos = 0;
    while (pos < text.size()) {
      int rc = pcre2_match(code_, subject, text.size(), pos, PCRE2_NOTEMPTY, match, nullptr);
      if (rc == PCRE2_ERROR_JIT_STACKLIMIT) {  // deep backtracking: the interpreter
        rc = pcre2_match(code_, subject, text.size(), pos, PCRE2_NOTEMPTY | PCRE2_NO_JIT,
                         match, nullptr);        // keeps its stack on the heap
      }
      if (rc < 0) break;  // no match (or a resource limit): the rest is one piece
      const PCRE2_SIZE* ovector = pcre2_get_ovector_pointer(match);
      size_t begin = ovector[0], end = ovector[1];
      if (begin > gap_start) out.push_back(text.substr(gap_start, begin - gap_start));
      out.push_back(text.substr(begin, end - begin));
      gap_start = pos = end;
    }
    if (gap_start < text.size()) out.push_back(text.substr(gap_start));
  }

  pcre2_code* code() const { return code_; }

 private:
  explicit SplitRegex(pcre2_code* code) : code_(code) {}
  pcre2_code* code_;
};

Result<PreTokenizer> PreTokenizer::from_patterns(const std::vector<std::string>& patterns,
                                                 std::string_view source, bool ignore_merges) {
  PreTokenizer pre;
  pre.ignore_merges_ = ignore_merges;
  for (const std::string& pattern : patterns) {
    auto regex = SplitRegex::compile(pattern, source);
    if (!regex) return regex.error();
    pre.regexes_.push_back(std::move(regex.value()));
  }
  return pre;
}

Result<PreTokenizer> PreTokenizer::for_name(std::string_view pre, std::string_view source) {
  if (name_in(pre, {"smollm", "starcoder", "refact", "command-r", "codeshell", "exaone",
                    "minerva-7b"})) {
    return from_patterns({kEachDigitPattern, kGpt2Pattern}, source);
  }
  if (name_in(pre, {"llama3", "llama-v3", "llama-bpe"})) {
    return from_patterns({kLlama3Pattern}, source, /*ignore_merges=*/true);
  }
  return from_patterns({kGpt2Pattern}, source);  // "default", "gpt2", ... and unknown
}

std::string PreTokenizer::gpt2_pattern() { return kGpt2Pattern; }

std::string PreTokenizer::digits_pattern(bool individual) {
  // Digits(individual_digits=false) keeps a run of digits together.
  return individual ? std::string(kEachDigitPattern) : std::string(kEachDigitPattern) + "+";
}

Result<std::string> PreTokenizer::from_oniguruma(std::string_view pattern) {
  std::string out;
  out.reserve(pattern.size() + 64);
  bool in_class = false;
  for (size_t i = 0; i < pattern.size(); ++i) {
    const char c = pattern[i];
    if (c == '\\') {
      if (i + 1 == pattern.size()) return Error{"ends in a lone backslash"};
      const char escaped = pattern[++i];
      if (escaped == 's') {
        out += in_class ? kSpaceClassBody : kSpaceClass;
      } else if (escaped == 'S') {
        // [^\S...] would need class subtraction, which PCRE2 lacks.
        if (in_class) return Error{"uses \\S inside a character class, which is not supported"};
        out += kNonSpaceClass;
      } else if (escaped == 'h' || escaped == 'H') {
        // Oniguruma: hexadecimal digit; PCRE2: horizontal space.
        return Error{std::string("uses \\") + escaped +
                     ", which means something else to PCRE2; write [0-9a-fA-F] instead"};
      } else {
        out += c;
        out += escaped;
      }
      continue;
    }
    if (c == '[' && !in_class) {
      in_class = true;
      out += c;
      // A ']' right after '[' or '[^' is a literal in both engines.
      if (i + 1 < pattern.size() && pattern[i + 1] == '^') out += pattern[++i];
      if (i + 1 < pattern.size() && pattern[i + 1] == ']') out += pattern[++i];
      continue;
    }
    if (c == '[' && in_class) {
      // POSIX classes such as [:alpha:] read the same; nested classes do not exist in PCRE2.
      if (i + 1 < pattern.size() && pattern[i + 1] == ':') {
        size_t end = pattern.find(":]", i + 2);
        if (end == std::string_view::npos) return Error{"has an unterminated [: class"};
        out.append(pattern.substr(i, end + 2 - i));
        i = end + 1;
        continue;
      }
      return Error{"nests a character class, which is not supported"};
    }
    if (c == ']' && in_class) in_class = false;
    out += c;
  }
  if (in_class) return Error{"has an unterminated character class"};
  return out;
}

std::string PreTokenizer::literal(std::string_view text) {
  std::string out;
  for (char c : text) {
    // Every ASCII punctuation character escaped is a literal in PCRE2.
    const auto u = static_cast<unsigned char>(c);
    if (u < 0x80 && !std::isalnum(u) && c != ' ' && c != '\n' && c != '\t' && c != '\r') {
      out += '\\';
    }
    out += c;
  }
  return out;
}

void PreTokenizer::split(std::string_view text, std::vector<std::string_view>& pieces) const {
  if (text.empty()) return;
  std::vector<std::string_view> current{text}, next;
  for (const auto& regex : regexes_) {
    pcre2_match_data* match = pcre2_match_data_create_from_pattern(regex->code(), nullptr);
    next.clear();
    for (std::string_view piece : current) regex->split(piece, match, next);
    pcre2_match_data_free(match);
    std::swap(current, next);
  }
  pieces.insert(pieces.end(), current.begin(), current.end());
}

}  // namespace inferlab::tokenizer_detail
