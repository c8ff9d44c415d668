// Byte-level BPE tokenizer: a tiny in-memory vocabulary (no download), the GGUF
// path, and the real SmolLM2 vocabulary against reference ids from Hugging Face
// `tokenizers` (regenerate with tests/reference/make_tokenizer_fixture.py).
#include <gtest/gtest.h>

#include <nlohmann/json.hpp>

#include <filesystem>
#include <fstream>
#include <random>
#include <string>
#include <vector>

#include "gguf/gguf.h"
#include "test_support.h"
#include "tokenizer/tokenizer.h"

namespace inferlab {
namespace test_tokenizer {

// 256 byte symbols, one token per merge result, then the given special tokens.
TokenizerVocab tiny_vocab(const std::vector<std::string>& merges, const std::string& pre = "gpt2") {
  TokenizerVocab vocab;
  vocab.source = "tiny-vocab";
  vocab.pre = pre;
  for (int b = 0; b < 256; ++b) vocab.tokens.push_back(byte_level_symbol(static_cast<uint8_t>(b)));
  vocab.types.assign(256, TokenType::Normal);
  for (const std::string& merge : merges) {
    std::string joined = merge;
    joined.erase(joined.find(' '), 1);
    vocab.tokens.push_back(joined);
    vocab.types.push_back(TokenType::Normal);
  }
  vocab.merges = merges;
  auto add = [&](const std::string& text, TokenType type) {
    vocab.tokens.push_back(text);
    vocab.types.push_back(type);
    return static_cast<TokenId>(vocab.tokens.size() - 1);
  };
  vocab.eos = add("<|endoftext|>", TokenType::Control);
  vocab.bos = add("<|im_start|>", TokenType::Control);
  add("<|im_end|>", TokenType::Control);
  add("<s>", TokenType::Control);
  add("<s>x", TokenType::Control);  // longer special sharing a prefix
  add("<tool>", TokenType::UserDefined);
  return vocab;
}

// Common English merges; "Ġ" is the space symbol.
const std::vector<std::string> kEnglishMerges = {
    "h e", "l l", "Ġ w", "o r", "he ll", "hell o", "Ġw or", "l d", "Ġwor ld", "Ġ t", "Ġt he",
    "' t", "Ġ Ġ", "1 2", "Ġ 1", "Ġ b",
};

std::unique_ptr<Tokenizer> make(const TokenizerVocab& vocab) {
  auto tok = Tokenizer::from_vocab(vocab);
  EXPECT_TRUE(tok.ok()) << (tok.ok() ? "" : tok.message());
  return tok.ok() ? std::move(tok).value() : nullptr;
}

// Token texts (byte-level form) of an encoding, for readable expectations.
std::vector<std::string> texts(const TokenizerVocab& vocab, const std::vector<TokenId>& ids) {
  std::vector<std::string> out;
  for (TokenId id : ids) out.push_back(vocab.tokens.at(id));
  return out;
}

using Texts = std::vector<std::string>;

TEST(TokenizerTiny, ByteLevelSymbolsFollowGpt2) {
  EXPECT_EQ(byte_level_symbol('a'), "a");
  EXPECT_EQ(byte_level_symbol(' '), "Ġ");     // U+0120
  EXPECT_EQ(byte_level_symbol('\n'), "Ċ");    // U+010A
  EXPECT_EQ(byte_level_symbol(0x00), "Ā");    // U+0100
  EXPECT_EQ(byte_level_symbol(0xAD), "Ń");    // U+0143, the last stand-in
  EXPECT_EQ(byte_level_symbol(0xE9), "é");    // printable Latin-1 stands for itself
}

TEST(TokenizerTiny, MergesApplyInRankOrder) {
  auto ab_first = tiny_vocab({"a b", "b c"});
  EXPECT_EQ(texts(ab_first, make(ab_first)->encode("abc", false, false)), (Texts{"ab", "c"}));
  auto bc_first = tiny_vocab({"b c", "a b"});
  EXPECT_EQ(texts(bc_first, make(bc_first)->encode("abc", false, false)), (Texts{"a", "bc"}));
}

TEST(TokenizerTiny, EqualRanksMergeLeftmostFirst) {
  auto vocab = tiny_vocab({"a a"});
  auto tok = make(vocab);
  EXPECT_EQ(texts(vocab, tok->encode("aaa", false, false)), (Texts{"aa", "a"}));
  EXPECT_EQ(texts(vocab, tok->encode("aaaaa", false, false)), (Texts{"aa", "aa", "a"}));
}

TEST(TokenizerTiny, MergesChainAcrossRanks) {
  auto vocab = tiny_vocab(kEnglishMerges);
  auto tok = make(vocab);
  EXPECT_EQ(texts(vocab, tok->encode("hello world", false, false)), (Texts{"hello", "Ġworld"}));
  EXPECT_EQ(texts(vocab, tok->encode("don't", false, false)), (Texts{"d", "o", "n", "'t"}));
}

TEST(TokenizerTiny, Gpt2PreTokenizerSplitsWhitespaceAndNumbers) {
  auto vocab = tiny_vocab(kEnglishMerges, "gpt2");
  auto tok = make(vocab);
  // "a  b": the run keeps all but its last space; that one joins the next word.
  EXPECT_EQ(texts(vocab, tok->encode("a  b", false, false)), (Texts{"a", "Ġ", "Ġb"}));
  EXPECT_EQ(texts(vocab, tok->encode("x 12", false, false)), (Texts{"x", "Ġ", "12"}));
}

TEST(TokenizerTiny, SmollmPreTokenizerIsolatesEveryDigit) {
  auto vocab = tiny_vocab(kEnglishMerges, "smollm");
  auto tok = make(vocab);
  EXPECT_EQ(texts(vocab, tok->encode("x 12", false, false)), (Texts{"x", "Ġ", "1", "2"}));
  EXPECT_EQ(texts(vocab, tok->encode("٣4", false, false)).size(), 3u);  // Arabic-Indic 3: two bytes
}

TEST(TokenizerTiny, Llama3PreTokenizerGroupsDigitsByThree) {
  auto vocab = tiny_vocab(kEnglishMerges, "llama-bpe");
  auto tok = make(vocab);
  EXPECT_EQ(texts(vocab, tok->encode("12345", false, false)),
            (Texts{"12", "3", "4", "5"}));  // pieces "123", "45"
}

TEST(TokenizerTiny, SpecialTokensNeedParseSpecial) {
  auto vocab = tiny_vocab(kEnglishMerges);
  auto tok = make(vocab);
  const std::string text = "<|im_start|>hello<|im_end|> world";
  auto with = tok->encode(text, false, true);
  EXPECT_EQ(texts(vocab, with), (Texts{"<|im_start|>", "hello", "<|im_end|>", "Ġworld"}));
  auto without = tok->encode(text, false, false);
  for (TokenId id : without) EXPECT_FALSE(tok->is_special(id)) << vocab.tokens[id];
  EXPECT_EQ(tok->decode(with), text);
  EXPECT_EQ(tok->decode(without), text);
}

TEST(TokenizerTiny, LongestSpecialTokenWins) {
  auto vocab = tiny_vocab({});
  auto tok = make(vocab);
  EXPECT_EQ(texts(vocab, tok->encode("<s>xy<s>y", false, true)), (Texts{"<s>x", "y", "<s>", "y"}));
}

TEST(TokenizerTiny, UserDefinedTokensAlwaysMatch) {
  auto vocab = tiny_vocab({});
  auto tok = make(vocab);
  EXPECT_EQ(texts(vocab, tok->encode("a<tool>b", false, false)), (Texts{"a", "<tool>", "b"}));
  EXPECT_FALSE(tok->is_special(tok->encode("<tool>", false, false).at(0)));
}

TEST(TokenizerTiny, BosIsPrependedOnlyWhenAskedAndPresent) {
  auto vocab = tiny_vocab({});
  auto tok = make(vocab);
  EXPECT_EQ(tok->encode("a", true, false).front(), vocab.bos);
  EXPECT_EQ(tok->encode("a", false, false).size(), 1u);
  EXPECT_TRUE(tok->is_special(vocab.bos));
  EXPECT_EQ(tok->token_to_piece(vocab.bos), "<|im_start|>");
  vocab.bos = -1;
  EXPECT_EQ(make(vocab)->encode("a", true, false).size(), 1u);
}

// Random text from pools that stress the pre-tokenizer: multi-byte letters,
// emoji with joiners, CJK, combining marks, odd whitespace, digits, specials.
std::string random_text(std::mt19937& rng, bool with_control_bytes) {
  static const std::vector<std::string> pools = {
      "abcdefghijklmnopqrstuvwxyzABCXYZ", "0123456789", " ", "   ", "\t\n\r\v\f",
      ".,;:!?'\"()[]{}<>|/\\-_+=*&^%$#@~`", "éüñçßøåŒ", "日本語中文한국어テキスト",
      "😀👍🏽🇺🇸👨‍👩‍👧", "\u0301\u0308\u0303\u200b\u200d\ufeff",
      "\u00a0\u2003\u3000\u2028\u2029\u0085\u180e", "١٢٣½²ⅷ", "Привет мир", "مرحبا עברית",
      "'s'll're've'd'm't", "<|im_start|>", "<|im_end|>", "<s>x", "<tool>", "\U0010FFFF"};
  std::string text;
  int n = std::uniform_int_distribution<int>(0, 30)(rng);
  for (int i = 0; i < n; ++i) {
    const std::string& pool = pools[rng() % pools.size()];
    if (rng() % 4 == 0 || pool.size() < 4) {
      text += pool;
    } else {  // a random substring, cut at code point boundaries
      size_t a = rng() % pool.size(), b = rng() % pool.size();
      if (a > b) std::swap(a, b);
      while (a > 0 && (static_cast<uint8_t>(pool[a]) & 0xC0) == 0x80) --a;
      while (b < pool.size() && (static_cast<uint8_t>(pool[b]) & 0xC0) == 0x80) ++b;
      text += pool.substr(a, b - a);
    }
    if (with_control_bytes && rng() % 8 == 0) text += static_cast<char>(rng() % 0x20);
  }
  return text;
}

TEST(TokenizerTiny, RandomUtf8RoundTrips) {
  for (const char* pre : {"gpt2", "smollm", "llama3"}) {
    auto tok = make(tiny_vocab(kEnglishMerges, pre));
    std::mt19937 rng(1234);
    for (int i = 0; i < 2000; ++i) {
      std::string text = random_text(rng, true);
      for (bool special : {false, true}) {
        ASSERT_EQ(tok->decode(tok->encode(text, false, special)), text)
            << "pre " << pre << ", parse_special " << special;
      }
    }
  }
}

TEST(TokenizerTiny, ArbitraryBytesRoundTrip) {
  auto tok = make(tiny_vocab(kEnglishMerges, "smollm"));
  std::mt19937 rng(99);
  for (int i = 0; i < 2000; ++i) {
    std::string bytes(rng() % 64, '\0');
    for (char& c : bytes) c = static_cast<char>(rng());
    ASSERT_EQ(tok->decode(tok->encode(bytes, false, true)), bytes);
  }
}

TEST(TokenizerTiny, VeryLongRunsRoundTrip) {
  auto tok = make(tiny_vocab(kEnglishMerges, "smollm"));
  std::string text = std::string(200000, ' ') + "a" + std::string(50000, '\n') +
                     std::string(100000, 'l') + std::string(50000, '7');
  auto ids = tok->encode(text, false, false);
  EXPECT_EQ(tok->decode(ids), text);
  // 199999 spaces pair up ("Ġ Ġ") leaving one; the last joins "a" as " a".
  EXPECT_EQ(ids.size(), 100000u + 2 + 50000 + 50000 + 50000);
}

TEST(TokenizerTiny, InvalidVocabulariesAreErrorsNamingTheKey) {
  auto expect_error = [](TokenizerVocab vocab, const std::string& needle) {
    auto tok = Tokenizer::from_vocab(std::move(vocab));
    ASSERT_FALSE(tok.ok()) << needle;
    EXPECT_NE(tok.message().find(needle), std::string::npos) << tok.message();
    EXPECT_NE(tok.message().find("tiny-vocab"), std::string::npos) << tok.message();
  };
  auto vocab = tiny_vocab({});
  vocab.model = "llama";
  expect_error(vocab, "unsupported tokenizer model 'llama'");
  vocab = tiny_vocab({});
  vocab.bos = 100000;
  expect_error(vocab, "tokenizer.ggml.bos_token_id");
  vocab = tiny_vocab({});
  vocab.types.pop_back();
  expect_error(vocab, "tokenizer.ggml.token_type");
  vocab = tiny_vocab({"a b"});
  vocab.merges.push_back("a zz");
  expect_error(vocab, "tokenizer.ggml.merges[1]");
  vocab = tiny_vocab({});
  vocab.tokens.clear();
  vocab.types.clear();
  expect_error(vocab, "tokenizer.ggml.tokens");
}

// ---- through a GGUF file ----------------------------------------------------------

void write_vocab(gguf::Writer& w, const TokenizerVocab& vocab) {
  w.set_string("tokenizer.ggml.model", vocab.model);
  w.set_string("tokenizer.ggml.pre", vocab.pre);
  w.set_string_array("tokenizer.ggml.tokens", vocab.tokens);
  std::vector<int32_t> types;
  for (TokenType t : vocab.types) types.push_back(static_cast<int32_t>(t));
  w.set_i32_array("tokenizer.ggml.token_type", types);
  w.set_string_array("tokenizer.ggml.merges", vocab.merges);
  w.set_u32("tokenizer.ggml.bos_token_id", static_cast<uint32_t>(vocab.bos));
  w.set_u32("tokenizer.ggml.eos_token_id", static_cast<uint32_t>(vocab.eos));
  w.set_bool("tokenizer.ggml.add_bos_token", true);
}

Result<std::unique_ptr<Tokenizer>> load_written(const gguf::Writer& w, const std::string& name) {
  auto path = test::temp_path(name + ".gguf");
  if (Status written = w.write(path); !written) return written.error();
  auto file = gguf::File::open(path);
  if (!file) return file.error();
  return Tokenizer::from_gguf(**file);
}

TEST(TokenizerGguf, ReadsWhatTheWriterWrote) {
  auto vocab = tiny_vocab(kEnglishMerges, "smollm");
  gguf::Writer w;
  write_vocab(w, vocab);
  auto tok = load_written(w, "tokenizer");
  ASSERT_TRUE(tok.ok()) << tok.message();
  auto reference = make(vocab);
  const std::string text = "<|im_start|>hello world 12 don't<|im_end|>";
  EXPECT_EQ((*tok)->encode(text, false, true), reference->encode(text, false, true));
  EXPECT_EQ((*tok)->vocab_size(), reference->vocab_size());
  EXPECT_EQ((*tok)->bos(), vocab.bos);
  EXPECT_EQ((*tok)->eos(), vocab.eos);
  EXPECT_TRUE((*tok)->add_bos_default());
}

TEST(TokenizerGguf, BadMetadataIsAnErrorNamingFileAndKey) {
  auto vocab = tiny_vocab({});
  auto expect_error = [](const gguf::Writer& w, const std::string& needle) {
    auto tok = load_written(w, "bad-tokenizer");
    ASSERT_FALSE(tok.ok()) << needle;
    EXPECT_NE(tok.message().find(needle), std::string::npos) << tok.message();
    EXPECT_NE(tok.message().find("bad-tokenizer.gguf"), std::string::npos) << tok.message();
  };
  gguf::Writer unsupported;
  write_vocab(unsupported, vocab);
  unsupported.set_string("tokenizer.ggml.model", "llama");
  expect_error(unsupported, "unsupported tokenizer model 'llama'");

  gguf::Writer no_tokens;
  no_tokens.set_string("tokenizer.ggml.model", "gpt2");
  expect_error(no_tokens, "tokenizer.ggml.tokens");

  gguf::Writer bos_out_of_range;
  write_vocab(bos_out_of_range, vocab);
  bos_out_of_range.set_u32("tokenizer.ggml.bos_token_id", 1u << 20);
  expect_error(bos_out_of_range, "tokenizer.ggml.bos_token_id");

  gguf::Writer ill_typed;
  write_vocab(ill_typed, vocab);
  ill_typed.set_string_array("tokenizer.ggml.token_type", {"normal"});
  expect_error(ill_typed, "tokenizer.ggml.token_type");
}

// ---- the real SmolLM2 vocabulary ------------------------------------------------

std::unique_ptr<Tokenizer> load_smollm2() {
  auto path = test::default_model_path();
  if (path.empty()) return nullptr;
  auto file = gguf::File::open(path);
  EXPECT_TRUE(file.ok()) << (file.ok() ? "" : file.message());
  if (!file) return nullptr;
  auto tok = Tokenizer::from_gguf(**file);
  EXPECT_TRUE(tok.ok()) << (tok.ok() ? "" : tok.message());
  return tok.ok() ? std::move(tok).value() : nullptr;
}

#define SKIP_WITHOUT_SMOLLM2(tok)                                                            \
  if (!(tok)) GTEST_SKIP() << "SmolLM2-135M-Instruct.Q4_1.gguf is not installed under "     \
                              "$INFERLAB_MODEL_DIR (default ~/.cache/inferlab/models)"

TEST(TokenizerSmolLM2, MatchesHuggingFaceReferenceIds) {
  auto tok = load_smollm2();
  SKIP_WITHOUT_SMOLLM2(tok);
  auto fixture_path = std::filesystem::path(__FILE__).parent_path() / ".." / "reference" /
                      "smollm2_tokenizer_cases.json";
  std::ifstream in(fixture_path);
  ASSERT_TRUE(in) << "cannot read " << fixture_path;
  auto fixture = nlohmann::json::parse(in);
  ASSERT_EQ(tok->vocab_size(), fixture["vocab_size"].get<int32_t>());
  int matched = 0;
  for (const auto& c : fixture["cases"]) {
    auto text = c["text"].get<std::string>();
    auto ids = tok->encode(text, fixture["add_bos"].get<bool>(), fixture["parse_special"].get<bool>());
    EXPECT_EQ(ids, c["ids"].get<std::vector<TokenId>>()) << "text: " << text;
    EXPECT_EQ(tok->decode(ids), text);
    matched += ids == c["ids"].get<std::vector<TokenId>>();
  }
  EXPECT_GE(fixture["cases"].size(), 30u);
  RecordProperty("matched", matched);
}

TEST(TokenizerSmolLM2, Metadata) {
  auto tok = load_smollm2();
  SKIP_WITHOUT_SMOLLM2(tok);
  EXPECT_EQ(tok->vocab_size(), 49152);
  EXPECT_EQ(tok->bos(), 1);
  EXPECT_EQ(tok->eos(), 2);
  EXPECT_FALSE(tok->add_bos_default());
  EXPECT_TRUE(tok->is_special(0));
  EXPECT_FALSE(tok->is_special(100));
  EXPECT_EQ(tok->token_to_piece(2), "<|im_end|>");
  EXPECT_EQ(tok->encode("<|im_end|>", false, true), (std::vector<TokenId>{2}));
}

TEST(TokenizerSmolLM2, RandomUtf8RoundTrips) {
  auto tok = load_smollm2();
  SKIP_WITHOUT_SMOLLM2(tok);
  std::mt19937 rng(4321);
  for (int i = 0; i < 3000; ++i) {
    // Without control bytes: the vocabulary has no symbol for some of them.
    std::string text = random_text(rng, false);
    for (bool special : {false, true}) {
      ASSERT_EQ(tok->decode(tok->encode(text, false, special)), text);
    }
  }
}

TEST(TokenizerSmolLM2, BytesWithoutASymbolAreDroppedLikeHuggingFace) {
  auto tok = load_smollm2();
  SKIP_WITHOUT_SMOLLM2(tok);
  // 0x16 and 0xFF have no token; <|endoftext|> is named "unknown" but is a control
  // token, so it must not stand in for them.
  auto ids = tok->encode("a\x16" "b\xff", false, false);
  EXPECT_EQ(tok->decode(ids), "ab");
  for (TokenId id : ids) EXPECT_FALSE(tok->is_special(id));
}

}  // namespace test_tokenizer
}  // namespace inferlab
