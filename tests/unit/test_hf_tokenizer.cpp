// Tokenizer::from_hf: Hugging Face tokenizer folders against the ids and decoded
// text of Hugging Face `tokenizers` itself (tests/reference/hf_tokenizer_cases.json,
// regenerate with tests/reference/make_hf_tokenizer_fixture.py), and files it must
// refuse with an error naming the file and the JSON key.
#include <gtest/gtest.h>

#include <nlohmann/json.hpp>

#include <filesystem>
#include <fstream>
#include <set>
#include <string>
#include <vector>

#include "test_support.h"
#include "tokenizer/tokenizer.h"

namespace inferlab {
namespace test_hf_tokenizer {

using nlohmann::json;

const std::filesystem::path kReference = std::filesystem::path(__FILE__).parent_path() / "../reference";

json read_json(const std::filesystem::path& path) {
  std::ifstream in(path);
  EXPECT_TRUE(in.good()) << path;
  return json::parse(in);
}

const json& cases_file() {
  static const json cases = read_json(kReference / "hf_tokenizer_cases.json");
  return cases;
}

void write_file(const std::filesystem::path& path, const std::string& text) {
  std::ofstream out(path, std::ios::binary);
  out << text;
}

// A tokenizer folder in a fresh temp directory: tokenizer.json, and
// tokenizer_config.json unless `config` is null.
std::filesystem::path write_folder(const json& tokenizer, const json& config = json()) {
  const auto dir = test::temp_path("hf-tokenizer");
  std::filesystem::create_directories(dir);
  write_file(dir / "tokenizer.json", tokenizer.dump());
  if (!config.is_null()) write_file(dir / "tokenizer_config.json", config.dump());
  return dir / "tokenizer.json";
}

std::filesystem::path fixture(const std::string& folder) {
  return kReference / "hf_tokenizers" / folder / "tokenizer.json";
}

std::unique_ptr<Tokenizer> load(const std::filesystem::path& tokenizer_json) {
  auto tok = Tokenizer::from_hf(tokenizer_json);
  EXPECT_TRUE(tok.ok()) << (tok.ok() ? "" : tok.message());
  return tok.ok() ? std::move(tok).value() : nullptr;
}

// The tokenizer a golden entry names: its folder, with the top-level
// tokenizer.json entries in "overrides" replaced (the variants).
std::unique_ptr<Tokenizer> load_entry(const json& entry) {
  const auto folder = kReference / entry.at("folder").get<std::string>();
  if (!entry.contains("overrides")) return load(folder / "tokenizer.json");
  json tokenizer = read_json(folder / "tokenizer.json");
  for (const auto& item : entry.at("overrides").items()) tokenizer[item.key()] = item.value();
  return load(write_folder(tokenizer, read_json(folder / "tokenizer_config.json")));
}

void expect_golden(const std::string& name) {
  const json& entry = cases_file().at("tokenizers").at(name);
  auto tok = load_entry(entry);
  ASSERT_NE(tok, nullptr);
  EXPECT_EQ(tok->vocab_size(), entry.at("vocab_size").get<int32_t>());
  EXPECT_EQ(tok->add_bos_default(), entry.at("add_bos").get<bool>());
  const json& cases = entry.at("cases");
  ASSERT_GE(cases.size(), 30u);
  for (const json& c : cases) {
    const auto text = c.at("text").get<std::string>();
    SCOPED_TRACE(name + ": \"" + text + "\"");
    const auto ids = c.at("ids").get<std::vector<TokenId>>();
    const auto plain = c.at("ids_plain").get<std::vector<TokenId>>();
    // tokenizers' encode matches every added token (parse_special) and adds BOS
    // with add_special_tokens=True where the tokenizer's default says so.
    EXPECT_EQ(tok->encode(text, tok->add_bos_default(), true), ids);
    EXPECT_EQ(tok->encode(text, false, true), plain);
    EXPECT_EQ(tok->decode(ids), c.at("decoded").get<std::string>());
    EXPECT_EQ(tok->decode(plain), c.at("decoded_plain").get<std::string>());
  }
}

const std::vector<std::string> kGoldenNames = {
    "bytelevel-llama3", "bytelevel-qwen2", "spm-llama2", "spm-metaspace",
    "spm-metaspace-split", "bytelevel-smollm", "bytelevel-gpt2"};

TEST(HfTokenizerGolden, EveryTokenizerInTheFileIsChecked) {
  std::set<std::string> in_file;
  for (const auto& item : cases_file().at("tokenizers").items()) in_file.insert(item.key());
  EXPECT_EQ(in_file, std::set<std::string>(kGoldenNames.begin(), kGoldenNames.end()));
}

// Split(Llama-3 regex) + ByteLevel, ignore_merges, BOS from the template.
TEST(HfTokenizerGolden, ByteLevelLlama3) { expect_golden("bytelevel-llama3"); }
// NFC (accepted, the texts are NFC already) + Split(Qwen2 regex) + ByteLevel, no BOS.
TEST(HfTokenizerGolden, ByteLevelQwen2) { expect_golden("bytelevel-qwen2"); }
// Prepend + Replace normalizer, byte fallback, merges as "a b" strings.
TEST(HfTokenizerGolden, SentencePieceStyleLlama2) { expect_golden("spm-llama2"); }
// Metaspace(prepend_scheme first): no "▁" before text that follows an added token.
TEST(HfTokenizerGolden, SentencePieceStyleMetaspaceFirst) { expect_golden("spm-metaspace"); }
TEST(HfTokenizerGolden, SentencePieceStyleMetaspaceSplit) { expect_golden("spm-metaspace-split"); }
// Digits(individual_digits) + ByteLevel(use_regex): SmolLM's pre-tokenizer.
TEST(HfTokenizerGolden, ByteLevelSmolLMDigits) { expect_golden("bytelevel-smollm"); }
// ByteLevel alone with add_prefix_space.
TEST(HfTokenizerGolden, ByteLevelGpt2PrefixSpace) { expect_golden("bytelevel-gpt2"); }

TEST(HfTokenizer, SpecialTokensComeFromTheConfig) {
  auto llama3 = load(fixture("bytelevel-llama3"));
  auto qwen2 = load(fixture("bytelevel-qwen2"));
  auto spm = load(fixture("spm-llama2"));
  ASSERT_TRUE(llama3 && qwen2 && spm);
  // bytelevel-llama3: <s> </s> <|im_start|> <|im_end|> <tool> are ids 379..383.
  EXPECT_EQ(llama3->bos(), 379);
  EXPECT_EQ(llama3->eos(), 380);
  EXPECT_TRUE(llama3->add_bos_default());
  // bytelevel-qwen2: bos_token null; <|endoftext|> <|im_start|> <|im_end|> <tool> from 380.
  EXPECT_EQ(qwen2->bos(), -1);
  EXPECT_EQ(qwen2->eos(), 382);
  EXPECT_FALSE(qwen2->add_bos_default());
  // spm-llama2: AddedToken objects in the config; <unk> <s> </s> are 0 1 2.
  EXPECT_EQ(spm->bos(), 1);
  EXPECT_EQ(spm->eos(), 2);
  EXPECT_TRUE(spm->add_bos_default());
  EXPECT_TRUE(spm->is_special(0));
  EXPECT_TRUE(spm->is_special(381));   // <|im_start|>
  EXPECT_FALSE(spm->is_special(383));  // <tool>, not special
  EXPECT_FALSE(spm->is_special(300));
  EXPECT_EQ(spm->token_to_piece(3 + 0xE2), "\xE2");  // <0xE2>, one byte
}

TEST(HfTokenizer, SpecialTokensNeedParseSpecialButAddedTokensDoNot) {
  auto tok = load(fixture("bytelevel-llama3"));
  ASSERT_NE(tok, nullptr);
  const auto parsed = tok->encode("<|im_start|>hi<tool>", false, true);
  const auto raw = tok->encode("<|im_start|>hi<tool>", false, false);
  EXPECT_EQ(parsed.front(), 381);
  EXPECT_EQ(parsed.back(), 383);
  EXPECT_NE(raw.front(), 381);  // spelled out in ordinary pieces
  EXPECT_EQ(raw.back(), 383);   // non-special added tokens always match
  EXPECT_EQ(tok->decode(raw), "<|im_start|>hi<tool>");
}

TEST(HfTokenizer, WithoutAConfigBosComesFromTheTemplateAndThereIsNoEos) {
  auto tok = load(write_folder(read_json(fixture("bytelevel-llama3"))));
  ASSERT_NE(tok, nullptr);
  EXPECT_EQ(tok->bos(), 379);
  EXPECT_TRUE(tok->add_bos_default());
  EXPECT_EQ(tok->eos(), -1);
}

TEST(HfTokenizer, ByteFallbackRoundTripsTextOutsideTheVocabulary) {
  auto tok = load(fixture("spm-llama2"));
  ASSERT_NE(tok, nullptr);
  const std::string text = "Ωmega 😀 and 中文 text";
  const auto ids = tok->encode(text, false, true);
  int bytes = 0;
  for (TokenId id : ids) bytes += (id >= 3 && id < 3 + 256) ? 1 : 0;
  EXPECT_EQ(bytes, 2 + 4 + 6);  // Ω, the emoji and two CJK characters, byte by byte
  EXPECT_EQ(tok->decode(ids), text);
}

// ---- files from_hf must refuse --------------------------------------------------------

// from_hf's error for `tokenizer_json`; every needle must be in it.
void expect_error(const std::filesystem::path& tokenizer_json, const std::vector<std::string>& needles) {
  auto tok = Tokenizer::from_hf(tokenizer_json);
  ASSERT_FALSE(tok.ok()) << "loaded, but should have failed with: " << needles.front();
  for (const std::string& needle : needles) {
    EXPECT_NE(tok.message().find(needle), std::string::npos) << tok.message();
  }
}

TEST(HfTokenizerErrors, MissingFile) {
  const auto path = test::temp_path("nowhere") / "tokenizer.json";
  expect_error(path, {path.string(), "no such file"});
}

TEST(HfTokenizerErrors, MalformedJsonNamesTheFileAndThePosition) {
  const auto dir = test::temp_path("malformed");
  std::filesystem::create_directories(dir);
  write_file(dir / "tokenizer.json", "{\"model\": {\"type\": \"BPE\",\n \"vocab\": }");
  expect_error(dir / "tokenizer.json",
               {(dir / "tokenizer.json").string(), "malformed JSON at byte", "line 2"});
}

TEST(HfTokenizerErrors, MalformedConfigNamesTheConfigFile) {
  const auto path = write_folder(read_json(fixture("spm-llama2")));
  write_file(path.parent_path() / "tokenizer_config.json", "{\"bos_token\": ");
  expect_error(path, {(path.parent_path() / "tokenizer_config.json").string(), "malformed JSON"});
}

TEST(HfTokenizerErrors, UnsupportedModelType) {
  json tokenizer = read_json(fixture("spm-llama2"));
  tokenizer["model"]["type"] = "Unigram";
  expect_error(write_folder(tokenizer), {"tokenizer.json", "model.type 'Unigram' is not supported",
                                         "supported: BPE"});
}

TEST(HfTokenizerErrors, UnsupportedPreTokenizer) {
  json tokenizer = read_json(fixture("bytelevel-qwen2"));
  auto& steps = tokenizer["pre_tokenizer"]["pretokenizers"];
  steps.insert(steps.begin() + 1, json{{"type", "Whitespace"}});
  expect_error(write_folder(tokenizer),
               {"tokenizer.json", "pre_tokenizer.pretokenizers[1].type 'Whitespace' is not supported",
                "Split", "ByteLevel", "Metaspace"});
}

TEST(HfTokenizerErrors, UnsupportedSplitBehavior) {
  json tokenizer = read_json(fixture("bytelevel-qwen2"));
  tokenizer["pre_tokenizer"]["pretokenizers"][0]["behavior"] = "MergedWithPrevious";
  expect_error(write_folder(tokenizer),
               {"tokenizer.json", "pre_tokenizer.pretokenizers[0].behavior 'MergedWithPrevious'"});
}

TEST(HfTokenizerErrors, UnsupportedNormalizerAndDecoder) {
  json normalizer = read_json(fixture("spm-llama2"));
  normalizer["normalizer"]["normalizers"][1] = json{{"type", "NFKC"}};
  expect_error(write_folder(normalizer),
               {"tokenizer.json", "normalizer.normalizers[1].type 'NFKC' is not supported"});
  json decoder = read_json(fixture("spm-llama2"));
  decoder["decoder"]["decoders"][2] = json{{"type", "CTC"}};
  expect_error(write_folder(decoder), {"tokenizer.json", "decoder.decoders[2].type 'CTC' is not supported"});
}

TEST(HfTokenizerErrors, IdGapNamesTheId) {
  json tokenizer = read_json(fixture("spm-llama2"));
  std::string removed;
  for (const auto& item : tokenizer["model"]["vocab"].items()) {
    if (item.value() == 300) removed = item.key();
  }
  ASSERT_FALSE(removed.empty());
  tokenizer["model"]["vocab"].erase(removed);
  expect_error(write_folder(tokenizer),
               {"tokenizer.json", "token id 300 is in neither model.vocab nor added_tokens"});
}

TEST(HfTokenizerErrors, MergeOutsideTheVocabularyNamesTheMerge) {
  json tokenizer = read_json(fixture("bytelevel-llama3"));
  tokenizer["model"]["merges"][3] = json::array({"Ġ", "no-such-token"});
  expect_error(write_folder(tokenizer), {"tokenizer.json", "model.merges[3]", "no-such-token"});
}

TEST(HfTokenizerErrors, ConfigTokenNotInTheVocabulary) {
  const json config = {{"bos_token", "<s>"}, {"eos_token", {{"content", "<|eot|>"}}}};
  expect_error(write_folder(read_json(fixture("spm-llama2")), config),
               {"tokenizer_config.json", "eos_token '<|eot|>' is not a token of"});
}

TEST(HfTokenizerErrors, TemplateAddingEosIsNotSupported) {
  json tokenizer = read_json(fixture("spm-llama2"));
  tokenizer["post_processor"]["single"].push_back(json{{"SpecialToken", {{"id", "<s>"}, {"type_id", 0}}}});
  expect_error(write_folder(tokenizer), {"tokenizer.json", "post_processor.single[2]"});
}

TEST(HfTokenizerErrors, WrongJsonTypesAreErrorsNotCrashes) {
  json tokenizer = read_json(fixture("bytelevel-llama3"));
  tokenizer["added_tokens"][0]["id"] = "379";
  expect_error(write_folder(tokenizer), {"tokenizer.json", "added_tokens[0].id is not an integer"});
  json vocab = read_json(fixture("bytelevel-llama3"));
  vocab["model"]["vocab"] = json::array();
  expect_error(write_folder(vocab), {"tokenizer.json", "model.vocab is not an object"});
}

}  // namespace test_hf_tokenizer
}  // namespace inferlab
