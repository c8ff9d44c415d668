// Tokenizer::from_hf: a Hugging Face tokenizer.json (and the tokenizer_config.json
// beside it) read into the vocabulary, pre-tokenizer and options that
// bpe_tokenizer.cpp runs. What is supported is listed in tokenizer.h; anything
// else is refused with the file and the JSON key, never guessed at.
#include <nlohmann/json.hpp>

#include <algorithm>
#include <cstdint>
#include <initializer_list>
#include <optional>
#include <string>
#include <string_view>
#include <unordered_map>
#include <utility>
#include <vector>

#include "formats/json_file.h"
#include "tokenizer/bpe_tokenizer.h"
#include "tokenizer/pre_tokenizer.h"
#include "tokenizer/tokenizer.h"
#include "tokenizer/try_result.h"

namespace inferlab {
namespace {

using nlohmann::json;
using tokenizer_detail::BpeOptions;
using tokenizer_detail::PrependScheme;
using tokenizer_detail::PreTokenizer;
using tokenizer_detail::TextRewrite;

// Sequences nest; a file nesting them deeper than this is refused rather than
// followed down the stack.
constexpr int kMaxNesting = 16;

const json& null_json() {
  static const json null_value;
  return null_value;
}

std::string join(std::initializer_list<std::string_view> names) {
  std::string out;
  for (std::string_view name : names) out += (out.empty() ? "" : ", ") + std::string(name);
  return out;
}

// A JSON value and the key path that reached it ("pre_tokenizer.pretokenizers[1]"),
// so that every error names the file and the key. The JSON and the file name
// must outlive it.
class Field {
 public:
  Field(const json& value, std::string key, const std::string& file)
      : value_(&value), key_(std::move(key)), file_(&file) {}

  const json& value() const { return *value_; }
  const std::string& key() const { return key_; }
  const std::string& file() const { return *file_; }
  bool present() const { return !value_->is_null(); }
  bool contains(const std::string& name) const {
    return value_->is_object() && value_->contains(name);
  }

  // A member; absent reads as null (present() false) under its key.
  Field operator[](const std::string& name) const {
    std::string key = key_.empty() ? name : key_ + "." + name;
    if (value_->is_object()) {
      auto it = value_->find(name);
      if (it != value_->end()) return Field(*it, std::move(key), *file_);
    }
    return Field(null_json(), std::move(key), *file_);
  }
  Field operator[](size_t index) const {
    return Field((*value_)[index], key_ + "[" + std::to_string(index) + "]", *file_);
  }

  Error error(const std::string& what) const {
    return Error{*file_ + ": " + key_ + " " + what};
  }

  Result<std::string> string() const {
    if (!value_->is_string()) return error(present() ? "is not a string" : "is missing");
    return value_->get<std::string>();
  }
  Result<bool> flag(bool fallback) const {
    if (!present()) return fallback;
    if (!value_->is_boolean()) return error("is not true or false");
    return value_->get<bool>();
  }
  Result<int64_t> integer(int64_t min, int64_t max) const {
    if (!value_->is_number_integer()) return error(present() ? "is not an integer" : "is missing");
    const bool too_big = value_->is_number_unsigned()
                             ? value_->get<uint64_t>() > static_cast<uint64_t>(max)
                             : value_->get<int64_t>() > max;
    if (too_big || (!value_->is_number_unsigned() && value_->get<int64_t>() < min)) {
      return error(value_->dump() + " is out of range (" + std::to_string(min) + ".." +
                   std::to_string(max) + ")");
    }
    return value_->get<int64_t>();
  }
  // Elements of an array (absent: none when `optional`).
  Result<size_t> array_size(bool optional = false) const {
    if (optional && !present()) return size_t{0};
    if (!value_->is_array()) return error(present() ? "is not an array" : "is missing");
    return value_->size();
  }
  // The "type" of a tagged object, one of `supported`.
  Result<std::string> type(std::initializer_list<std::string_view> supported) const {
    Field field = (*this)["type"];
    std::string name;
    INFERLAB_TRY_ASSIGN(name, field.string());
    for (std::string_view s : supported) {
      if (name == s) return name;
    }
    return field.error("'" + name + "' is not supported (supported: " + join(supported) + ")");
  }

 private:
  const json* value_;
  std::string key_;
  const std::string* file_;
};

// "<0xHH>" (either case of hex digit), the form byte_fallback tokens take.
bool is_byte_token(std::string_view text) {
  auto hex = [](char c) {
    return (c >= '0' && c <= '9') || (c >= 'A' && c <= 'F') || (c >= 'a' && c <= 'f');
  };
  return text.size() == 6 && text.substr(0, 3) == "<0x" && hex(text[3]) && hex(text[4]) &&
         text[5] == '>';
}

// Everything read from the two files, on its way to make_bpe_tokenizer.
struct HfTokenizer {
  TokenizerVocab vocab;
  BpeOptions options;
  std::vector<std::string> patterns;  // the pre-tokenizer's regexes, in order
  bool ignore_merges = false;
  std::unordered_map<std::string, TokenId> ids;  // token text -> id (added tokens win)
};

// ---- model ---------------------------------------------------------------------

Status read_model(const Field& model, HfTokenizer& hf) {
  INFERLAB_TRY(model.type({"BPE"}));
  Field dropout = model["dropout"];
  if (dropout.present() && !(dropout.value().is_number() && dropout.value().get<double>() == 0.0)) {
    return dropout.error(dropout.value().dump() +
                         " is not supported (BPE dropout encodes at random; only null)");
  }
  for (const char* key : {"continuing_subword_prefix", "end_of_word_suffix"}) {
    Field affix = model[key];
    if (affix.present() && !(affix.value().is_string() && affix.value().get<std::string>().empty())) {
      return affix.error(affix.value().dump() + " is not supported (only null)");
    }
  }
  INFERLAB_TRY_ASSIGN(hf.options.fuse_unknown, model["fuse_unk"].flag(false));
  INFERLAB_TRY_ASSIGN(hf.options.byte_fallback, model["byte_fallback"].flag(false));
  INFERLAB_TRY_ASSIGN(hf.ignore_merges, model["ignore_merges"].flag(false));

  Field merges = model["merges"];
  size_t n_merges = 0;
  INFERLAB_TRY_ASSIGN(n_merges, merges.array_size());
  hf.vocab.merges.reserve(n_merges);
  for (size_t i = 0; i < n_merges; ++i) {
    Field merge = merges[i];
    if (merge.value().is_string()) {  // "left right", as older files write them
      hf.vocab.merges.push_back(merge.value().get<std::string>());
      continue;
    }
    // [left, right], as tokenizers >= 0.20 writes them.
    if (!merge.value().is_array() || merge.value().size() != 2 || !merge.value()[0].is_string() ||
        !merge.value()[1].is_string()) {
      return merge.error("is neither a \"left right\" string nor a [left, right] pair of strings");
    }
    std::string left = merge.value()[0].get<std::string>();
    if (left.find(' ') != std::string::npos) {
      return merge.error("has a space in its left token '" + left + "', which is not supported");
    }
    hf.vocab.merges.push_back(left + " " + merge.value()[1].get<std::string>());
  }
  return ok_status();
}

// model.vocab and added_tokens into dense ids, token texts and types.
Status read_tokens(const Field& root, HfTokenizer& hf) {
  Field model = root["model"];
  Field vocab = model["vocab"];
  if (!vocab.value().is_object()) {
    return vocab.error(vocab.present() ? "is not an object of token: id" : "is missing");
  }
  Field added = root["added_tokens"];
  size_t n_added = 0;
  INFERLAB_TRY_ASSIGN(n_added, added.array_size(/*optional=*/true));

  // Every id below `bound` fits in the tables; an id at or above it means a gap
  // below it (there are at most `bound` distinct ids), reported as that gap.
  const size_t bound = vocab.value().size() + n_added;
  std::vector<std::string> tokens(bound);
  std::vector<char> have(bound, 0);
  std::vector<TokenType> types(bound, TokenType::Normal);
  int64_t max_id = -1;
  for (auto it = vocab.value().begin(); it != vocab.value().end(); ++it) {
    Field entry(it.value(), vocab.key() + "['" + it.key() + "']", root.file());
    int64_t id = 0;
    INFERLAB_TRY_ASSIGN(id, entry.integer(0, INT32_MAX - 1));
    max_id = std::max(max_id, id);
    if (static_cast<size_t>(id) >= bound) continue;
    if (have[id]) {
      return entry.error("= " + std::to_string(id) + ", the id of '" + tokens[id] + "' too");
    }
    tokens[id] = it.key();
    have[id] = 1;
  }
  for (size_t i = 0; i < n_added; ++i) {
    Field token = added[i];
    int64_t id = 0;
    std::string content;
    bool special = false;
    INFERLAB_TRY_ASSIGN(id, token["id"].integer(0, INT32_MAX - 1));
    INFERLAB_TRY_ASSIGN(content, token["content"].string());
    INFERLAB_TRY_ASSIGN(special, token["special"].flag(false));
    if (content.empty()) return token["content"].error("is empty");
    // lstrip, rstrip, single_word and normalized are ignored (see tokenizer.h).
    auto in_vocab = vocab.value().find(content);
    if (in_vocab != vocab.value().end() && in_vocab->is_number_integer() &&
        in_vocab->get<int64_t>() != id) {
      return token["id"].error("= " + std::to_string(id) + " but model.vocab gives '" + content +
                               "' the id " + std::to_string(in_vocab->get<int64_t>()));
    }
    max_id = std::max(max_id, id);
    if (static_cast<size_t>(id) >= bound) continue;
    if (have[id] && tokens[id] != content) {
      return token["id"].error("= " + std::to_string(id) + ", the id of '" + tokens[id] +
                               "' already, not of '" + content + "'");
    }
    tokens[id] = content;
    have[id] = 1;
    types[id] = special ? TokenType::Control : TokenType::UserDefined;
  }
  if (max_id < 0) return Error{root.file() + ": model.vocab and added_tokens are both empty"};
  for (size_t id = 0; id <= static_cast<size_t>(max_id); ++id) {
    if (id >= bound || !have[id]) {
      return Error{root.file() + ": token id " + std::to_string(id) +
                   " is in neither model.vocab nor added_tokens; ids must run from 0 to " +
                   std::to_string(max_id) + " without a gap"};
    }
  }
  const auto n = static_cast<size_t>(max_id) + 1;
  tokens.resize(n);
  types.resize(n);

  for (size_t id = 0; id < n; ++id) {
    if (types[id] == TokenType::Normal && hf.options.byte_fallback && is_byte_token(tokens[id])) {
      types[id] = TokenType::Byte;
    }
    hf.ids.emplace(tokens[id], static_cast<TokenId>(id));  // first id of a repeated text
  }
  for (size_t id = 0; id < n; ++id) {  // an added token's text means the added token
    if (types[id] == TokenType::Control || types[id] == TokenType::UserDefined) {
      hf.ids[tokens[id]] = static_cast<TokenId>(id);
    }
  }
  Field unk = model["unk_token"];
  if (unk.present()) {
    std::string text;
    INFERLAB_TRY_ASSIGN(text, unk.string());
    auto it = hf.ids.find(text);
    if (it == hf.ids.end()) return unk.error("'" + text + "' is not a token of the vocabulary");
    hf.vocab.unknown = it->second;
    types[it->second] = TokenType::Unknown;
  }
  hf.vocab.tokens = std::move(tokens);
  hf.vocab.types = std::move(types);
  return ok_status();
}

// ---- normalizer, pre-tokenizer, decoder -------------------------------------------

Status read_normalizer(const Field& field, HfTokenizer& hf, int depth) {
  if (!field.present()) return ok_status();
  if (depth > kMaxNesting) return field.error("nests Sequences too deeply");
  std::string type;
  INFERLAB_TRY_ASSIGN(type, field.type({"Sequence", "Prepend", "Replace", "NFC"}));
  if (type == "Sequence") {
    Field steps = field["normalizers"];
    size_t n = 0;
    INFERLAB_TRY_ASSIGN(n, steps.array_size());
    for (size_t i = 0; i < n; ++i) INFERLAB_TRY(read_normalizer(steps[i], hf, depth + 1));
  } else if (type == "Prepend") {
    TextRewrite step{TextRewrite::Kind::Prepend, {}, {}};
    INFERLAB_TRY_ASSIGN(step.text, field["prepend"].string());
    hf.options.normalize.push_back(std::move(step));
  } else if (type == "Replace") {
    Field pattern = field["pattern"];
    if (pattern["Regex"].present()) {
      return pattern["Regex"].error("is not supported (only a String pattern)");
    }
    TextRewrite step{TextRewrite::Kind::Replace, {}, {}};
    INFERLAB_TRY_ASSIGN(step.text, pattern["String"].string());
    INFERLAB_TRY_ASSIGN(step.replacement, field["content"].string());
    if (step.text.empty()) return pattern["String"].error("is empty");
    hf.options.normalize.push_back(std::move(step));
  }
  // NFC: accepted, not applied (see tokenizer.h).
  return ok_status();
}

// Sequences flattened into their steps, in order.
Status flatten(const Field& field, const char* list_key, std::vector<Field>& steps, int depth) {
  if (depth > kMaxNesting) return field.error("nests Sequences too deeply");
  const json& type = field["type"].value();
  if (!type.is_string() || type.get<std::string>() != "Sequence") {
    steps.push_back(field);
    return ok_status();
  }
  Field list = field[list_key];
  size_t n = 0;
  INFERLAB_TRY_ASSIGN(n, list.array_size());
  for (size_t i = 0; i < n; ++i) INFERLAB_TRY(flatten(list[i], list_key, steps, depth + 1));
  return ok_status();
}

Result<PrependScheme> prepend_scheme(const Field& metaspace) {
  Field scheme = metaspace["prepend_scheme"];
  if (!scheme.present()) {  // older files: add_prefix_space
    bool add = true;
    INFERLAB_TRY_ASSIGN(add, metaspace["add_prefix_space"].flag(true));
    return add ? PrependScheme::Always : PrependScheme::Never;
  }
  std::string name;
  INFERLAB_TRY_ASSIGN(name, scheme.string());
  if (name == "always") return PrependScheme::Always;
  if (name == "first") return PrependScheme::First;
  if (name == "never") return PrependScheme::Never;
  return scheme.error("'" + name + "' is not a prepend scheme (always, first, never)");
}

Status read_pre_tokenizer(const Field& field, HfTokenizer& hf) {
  if (!field.present()) return ok_status();
  std::vector<Field> steps;
  INFERLAB_TRY(flatten(field, "pretokenizers", steps, 0));
  BpeOptions& options = hf.options;
  for (size_t i = 0; i < steps.size(); ++i) {
    const Field& step = steps[i];
    std::string type;
    INFERLAB_TRY_ASSIGN(type, step.type({"Sequence", "Split", "Digits", "ByteLevel", "Metaspace"}));
    // Text is split by the regexes first and then mapped to bytes, so ByteLevel
    // can only come last; Metaspace rewrites the text, so it must be alone.
    if (options.byte_level) {
      return step.error("comes after ByteLevel, which is not supported (ByteLevel must be last)");
    }
    if (type == "Split") {
      Field behavior = step["behavior"];
      std::string name;
      INFERLAB_TRY_ASSIGN(name, behavior.string());
      if (name != "Isolated") {
        return behavior.error("'" + name + "' is not supported (supported: Isolated)");
      }
      bool invert = false;
      INFERLAB_TRY_ASSIGN(invert, step["invert"].flag(false));
      if (invert) return step["invert"].error("true is not supported");
      Field pattern = step["pattern"];
      if (pattern["Regex"].present()) {
        std::string regex;
        INFERLAB_TRY_ASSIGN(regex, pattern["Regex"].string());
        auto translated = PreTokenizer::from_oniguruma(regex);
        if (!translated) return pattern["Regex"].error("'" + regex + "' " + translated.message());
        // Compiled here once to name the key if PCRE2 refuses it.
        auto compiled = PreTokenizer::from_patterns({translated.value()}, step.file());
        if (!compiled) return pattern["Regex"].error("does not compile: " + compiled.message());
        hf.patterns.push_back(std::move(translated.value()));
      } else {
        std::string literal;
        INFERLAB_TRY_ASSIGN(literal, pattern["String"].string());
        if (literal.empty()) return pattern["String"].error("is empty");
        hf.patterns.push_back(PreTokenizer::literal(literal));
      }
    } else if (type == "Digits") {
      bool individual = false;
      INFERLAB_TRY_ASSIGN(individual, step["individual_digits"].flag(false));
      hf.patterns.push_back(PreTokenizer::digits_pattern(individual));
    } else if (type == "ByteLevel") {
      options.byte_level = true;
      bool use_regex = true, prefix_space = true;
      INFERLAB_TRY_ASSIGN(use_regex, step["use_regex"].flag(true));
      INFERLAB_TRY_ASSIGN(prefix_space, step["add_prefix_space"].flag(true));
      if (use_regex) hf.patterns.push_back(PreTokenizer::gpt2_pattern());
      // Alone, the prefix space goes before each segment; after splits, HF would
      // put one before every piece, which no tokenizer wants.
      if (prefix_space && steps.size() > 1) {
        return step["add_prefix_space"].error("true is supported only when ByteLevel is the only pre-tokenizer");
      }
      options.add_prefix_space = prefix_space;
    } else if (type == "Metaspace") {
      if (steps.size() > 1) {
        return step.error("is supported only as the whole pre_tokenizer, not in a Sequence");
      }
      INFERLAB_TRY_ASSIGN(options.metaspace, step["replacement"].string());
      if (options.metaspace.empty()) return step["replacement"].error("is empty");
      INFERLAB_TRY_ASSIGN(options.metaspace_prepend, prepend_scheme(step));
      INFERLAB_TRY_ASSIGN(options.metaspace_split, step["split"].flag(true));
    }
  }
  return ok_status();
}

Status read_decoder(const Field& field, HfTokenizer& hf) {
  BpeOptions& options = hf.options;
  if (!field.present()) {
    return field.error("is null, which is not supported (a ByteLevel decoder, or Replace/ByteFallback/Fuse/Strip)");
  }
  std::vector<Field> steps;
  INFERLAB_TRY(flatten(field, "decoders", steps, 0));
  bool byte_level = false, byte_fallback = false;
  for (const Field& step : steps) {
    std::string type;
    if (options.byte_level) {
      INFERLAB_TRY_ASSIGN(type, step.type({"ByteLevel"}));
      byte_level = true;
      continue;
    }
    INFERLAB_TRY_ASSIGN(type, step.type({"Replace", "ByteFallback", "Fuse", "Strip", "Metaspace"}));
    if (type == "Replace") {
      std::string from, to;
      INFERLAB_TRY_ASSIGN(from, step["pattern"]["String"].string());
      INFERLAB_TRY_ASSIGN(to, step["content"].string());
      if (to != " ") return step["content"].error("'" + to + "' is not supported (only \" \")");
      if (from.empty()) return step["pattern"]["String"].error("is empty");
      options.space_symbol = from;
    } else if (type == "ByteFallback") {
      byte_fallback = true;
    } else if (type == "Strip") {
      std::string content;
      int64_t start = 0, stop = 0;
      INFERLAB_TRY_ASSIGN(content, step["content"].string());
      INFERLAB_TRY_ASSIGN(start, step["start"].integer(0, 1024));
      INFERLAB_TRY_ASSIGN(stop, step["stop"].integer(0, 1024));
      if (content != " ") return step["content"].error("'" + content + "' is not supported (only \" \")");
      if (stop != 0) return step["stop"].error("= " + std::to_string(stop) + " is not supported (only 0)");
      options.strip_leading_spaces = static_cast<int>(start);
    } else if (type == "Metaspace") {
      PrependScheme scheme = PrependScheme::Always;
      INFERLAB_TRY_ASSIGN(options.space_symbol, step["replacement"].string());
      INFERLAB_TRY_ASSIGN(scheme, prepend_scheme(step));
      options.strip_leading_spaces = scheme == PrependScheme::Never ? 0 : 1;
    }
    // Fuse: decode() concatenates anyway.
  }
  if (options.byte_level && !byte_level) {
    return field.error("has no ByteLevel step, which the ByteLevel pre_tokenizer needs");
  }
  if (!options.byte_level && options.byte_fallback && !byte_fallback) {
    return field.error("has no ByteFallback step, which model.byte_fallback needs");
  }
  return ok_status();
}

// The special token a TemplateProcessing puts before the text ("<s> $A"), if any.
Result<std::optional<TokenId>> read_post_processor(const Field& field, const HfTokenizer& hf,
                                                   int depth) {
  std::optional<TokenId> bos;
  if (!field.present()) return bos;
  if (depth > kMaxNesting) return field.error("nests Sequences too deeply");
  std::string type;
  INFERLAB_TRY_ASSIGN(type, field.type({"Sequence", "ByteLevel", "TemplateProcessing"}));
  if (type == "Sequence") {
    Field list = field["processors"];
    size_t n = 0;
    INFERLAB_TRY_ASSIGN(n, list.array_size());
    for (size_t i = 0; i < n; ++i) {
      std::optional<TokenId> inner;
      INFERLAB_TRY_ASSIGN(inner, read_post_processor(list[i], hf, depth + 1));
      if (inner && bos) return list[i].error("is a second template adding a BOS, which is not supported");
      if (inner) bos = inner;
    }
    return bos;
  }
  if (type == "ByteLevel") return bos;  // it only adjusts offsets
  Field single = field["single"];
  size_t n = 0;
  INFERLAB_TRY_ASSIGN(n, single.array_size());
  const std::string supported = "is not supported (only \"$A\" or \"<bos> $A\")";
  bool text_seen = false;
  for (size_t i = 0; i < n; ++i) {
    Field piece = single[i];
    if (piece["Sequence"].present()) {
      std::string id;
      INFERLAB_TRY_ASSIGN(id, piece["Sequence"]["id"].string());
      if (id != "A" || text_seen) return piece.error(supported);
      text_seen = true;
      continue;
    }
    if (!piece["SpecialToken"].present() || i != 0) return piece.error(supported);
    std::string name;
    INFERLAB_TRY_ASSIGN(name, piece["SpecialToken"]["id"].string());
    Field ids = field["special_tokens"][name]["ids"];
    size_t n_ids = 0;
    INFERLAB_TRY_ASSIGN(n_ids, ids.array_size());
    if (n_ids != 1) return ids.error("has " + std::to_string(n_ids) + " ids; only one is supported");
    int64_t id = 0;
    INFERLAB_TRY_ASSIGN(id, ids[0].integer(0, static_cast<int64_t>(hf.vocab.tokens.size()) - 1));
    bos = static_cast<TokenId>(id);
  }
  if (!text_seen) return single.error(supported);
  return bos;
}

// ---- tokenizer_config.json ----------------------------------------------------------

// bos_token etc.: absent or null -> nullopt; a string or {"content": ...} -> its id.
Result<std::optional<TokenId>> config_token(const Field& config, const char* key,
                                            const HfTokenizer& hf, const std::string& tokenizer_json) {
  Field field = config[key];
  if (!field.present()) return std::optional<TokenId>{};
  std::string text;
  if (field.value().is_object()) {
    INFERLAB_TRY_ASSIGN(text, field["content"].string());
  } else if (field.value().is_string()) {
    text = field.value().get<std::string>();
  } else {
    return field.error("is neither a string nor an object with \"content\"");
  }
  auto it = hf.ids.find(text);
  if (it == hf.ids.end()) return field.error("'" + text + "' is not a token of " + tokenizer_json);
  return std::optional<TokenId>(it->second);
}

Status read_special_ids(const std::filesystem::path& tokenizer_json, const Field& root,
                        HfTokenizer& hf) {
  std::optional<TokenId> template_bos;
  INFERLAB_TRY_ASSIGN(template_bos, read_post_processor(root["post_processor"], hf, 0));
  TokenizerVocab& vocab = hf.vocab;
  vocab.bos = template_bos.value_or(-1);
  vocab.add_bos = template_bos.has_value();

  const auto config_path = tokenizer_json.parent_path() / "tokenizer_config.json";
  std::error_code ec;
  if (!std::filesystem::exists(config_path, ec)) return ok_status();
  json config_json;
  INFERLAB_TRY_ASSIGN(config_json, read_json_object(config_path));
  const std::string config_file = config_path.string();
  Field config(config_json, "", config_file);
  const std::string& json_file = root.file();

  std::optional<TokenId> token;
  if (config.contains("bos_token")) {
    INFERLAB_TRY_ASSIGN(token, config_token(config, "bos_token", hf, json_file));
    if (template_bos && token != template_bos && !config.contains("add_bos_token")) {
      return config["bos_token"].error(
          "is not the token the post_processor of " + json_file + " adds before the text ('" +
          vocab.tokens[*template_bos] + "'), and add_bos_token does not say which to use");
    }
    vocab.bos = token.value_or(-1);
  }
  INFERLAB_TRY_ASSIGN(vocab.add_bos, config["add_bos_token"].flag(vocab.add_bos));
  if (vocab.add_bos && vocab.bos < 0) return config["add_bos_token"].error("is true but there is no bos_token");
  bool add_eos = false;
  INFERLAB_TRY_ASSIGN(add_eos, config["add_eos_token"].flag(false));
  if (add_eos) return config["add_eos_token"].error("true is not supported");
  INFERLAB_TRY_ASSIGN(token, config_token(config, "eos_token", hf, json_file));
  vocab.eos = token.value_or(-1);
  INFERLAB_TRY_ASSIGN(token, config_token(config, "pad_token", hf, json_file));
  vocab.padding = token.value_or(-1);
  // What stands for unknown text is model.unk_token, as in HF; the config's
  // unk_token only names one where the model has none (and encodes nothing).
  INFERLAB_TRY_ASSIGN(token, config_token(config, "unk_token", hf, json_file));
  if (token && vocab.unknown < 0) vocab.unknown = *token;
  return ok_status();
}

Result<std::unique_ptr<Tokenizer>> load(const std::filesystem::path& tokenizer_json) {
  json root_json;
  INFERLAB_TRY_ASSIGN(root_json, read_json_object(tokenizer_json));
  const std::string file = tokenizer_json.string();
  Field root(root_json, "", file);

  HfTokenizer hf;
  hf.vocab.source = file;
  hf.vocab.model = "hf-bpe";
  hf.vocab.pre = "tokenizer.json";
  hf.options.merges_key = "model.merges";
  hf.options.byte_level = false;  // until a ByteLevel pre-tokenizer says so
  INFERLAB_TRY(read_model(root["model"], hf));
  INFERLAB_TRY(read_tokens(root, hf));
  INFERLAB_TRY(read_normalizer(root["normalizer"], hf, 0));
  INFERLAB_TRY(read_pre_tokenizer(root["pre_tokenizer"], hf));
  INFERLAB_TRY(read_decoder(root["decoder"], hf));
  INFERLAB_TRY(read_special_ids(tokenizer_json, root, hf));

  auto pre = PreTokenizer::from_patterns(hf.patterns, file, hf.ignore_merges);
  if (!pre) return pre.error();
  return tokenizer_detail::make_bpe_tokenizer(std::move(hf.vocab), std::move(hf.options),
                                              std::move(pre.value()));
}

#undef INFERLAB_TRY
#undef INFERLAB_TRY_ASSIGN

}  // namespace

Result<std::unique_ptr<Tokenizer>> Tokenizer::from_hf(const std::filesystem::path& tokenizer_json) {
  // nlohmann throws on a few misuses (a key of the wrong type read as a number,
  // say); every read above checks types first, but a file must never crash the host.
  try {
    return load(tokenizer_json);
  } catch (const std::exception& e) {
    return Error{tokenizer_json.string() + ": cannot be read as a tokenizer (" + e.what() + ")"};
  }
}

}  // namespace inferlab
