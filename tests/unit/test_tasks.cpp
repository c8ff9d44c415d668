// Task generators: determinism, prompt lengths, needle placement, answers that
// really are in the prompt, scoring, parameter errors, and corpus segments.
// Each generation check runs with a synthetic model's byte-level tokenizer and,
// when it is installed, the real SmolLM2 tokenizer.
#include <gtest/gtest.h>

#include <cstdlib>
#include <fstream>
#include <map>
#include <regex>
#include <set>

#include "datasets/task_support.h"
#include "datasets/tasks.h"
#include "gguf/gguf.h"
#include "test_support.h"

namespace inferlab {
namespace test_tasks {

// ---- helpers -------------------------------------------------------------------

const Tokenizer* synthetic_tokenizer() {
  static std::shared_ptr<Model> model = [] {
    SyntheticModelSpec spec;
    spec.name = "tasks";
    spec.n_merges = 128;
    return test::load_synthetic(spec);
  }();
  return model ? &model->tokenizer() : nullptr;
}

const Tokenizer* real_tokenizer() {
  static std::unique_ptr<Tokenizer> tok = []() -> std::unique_ptr<Tokenizer> {
    const auto path = test::default_model_path();
    if (path.empty()) return nullptr;
    auto file = gguf::File::open(path);
    if (!file) return nullptr;
    auto loaded = Tokenizer::from_gguf(**file);
    return loaded ? std::move(loaded).value() : nullptr;
  }();
  return tok.get();
}

TaskParams params(std::map<std::string, std::vector<ParamValue>> values) { return TaskParams(std::move(values)); }

std::unique_ptr<Task> make(const std::string& type, const TaskParams& p = {}) {
  auto task = make_task(type, p);
  EXPECT_TRUE(task.ok()) << (task.ok() ? "" : task.message());
  return task.ok() ? std::move(task).value() : nullptr;
}

std::vector<TaskSample> generate(const Task& task, const Tokenizer& tok, uint64_t seed = 1,
                                 int32_t max_context = 8192) {
  auto samples = task.samples(tok, max_context, seed);
  EXPECT_TRUE(samples.ok()) << (samples.ok() ? "" : samples.message());
  return samples.ok() ? *samples : std::vector<TaskSample>{};
}

size_t count_of(const std::string& text, const std::string& part) {
  size_t n = 0;
  for (size_t pos = text.find(part); pos != std::string::npos; pos = text.find(part, pos + 1)) ++n;
  return n;
}

// Index of the token that holds byte `offset` of the decoded prompt.
size_t token_at(const Tokenizer& tok, const std::vector<int32_t>& tokens, size_t offset) {
  size_t bytes = 0;
  for (size_t i = 0; i < tokens.size(); ++i) {
    bytes += tok.token_to_piece(tokens[i]).size();
    if (bytes > offset) return i;
  }
  return tokens.size();
}

std::vector<std::smatch> all_matches(const std::string& text, const std::regex& re) {
  std::vector<std::smatch> out;
  for (auto it = std::sregex_iterator(text.begin(), text.end(), re); it != std::sregex_iterator(); ++it)
    out.push_back(*it);
  return out;
}

void expect_error(const Result<std::unique_ptr<Task>>& r, const std::vector<std::string>& parts) {
  ASSERT_FALSE(r.ok());
  for (const auto& part : parts) EXPECT_NE(r.message().find(part), std::string::npos) << r.message();
}

// Generation tasks with each tokenizer: "synthetic" always, "smollm2" when installed.
class TaskGeneration : public testing::TestWithParam<std::string> {
 protected:
  void SetUp() override {
    tok_ = GetParam() == "synthetic" ? synthetic_tokenizer() : real_tokenizer();
    if (!tok_ && GetParam() != "synthetic") GTEST_SKIP() << "default model not installed (scripts/fetch-model.sh)";
    ASSERT_NE(tok_, nullptr);
  }
  std::string text(const TaskSample& s) const { return tok_->decode(s.prompt_tokens); }
  // Prompts are never longer than asked, and shorter by no more than `slack`.
  void expect_length(const TaskSample& s, int64_t length, int64_t slack) const {
    const auto n = int64_t(s.prompt_tokens.size());
    EXPECT_LE(n, length) << s.id;
    EXPECT_GE(n, length - slack) << s.id;
    EXPECT_EQ(s.tags.at("context_tokens"), double(n)) << s.id;
  }
  const Tokenizer* tok_ = nullptr;
};

INSTANTIATE_TEST_SUITE_P(TaskTokenizers, TaskGeneration, testing::Values("synthetic", "smollm2"));

// ---- catalog and parameters -------------------------------------------------------

TEST(TaskCatalog, EveryTaskBuildsFromDefaults) {
  std::set<std::string> names;
  for (const auto& info : task_catalog()) {
    EXPECT_TRUE(names.insert(info.name).second) << info.name;
    EXPECT_FALSE(info.description.empty()) << info.name;
    for (const auto& p : info.params) EXPECT_FALSE(p.spec.help.empty()) << info.name << "." << p.spec.name;
    auto task = make(info.name);
    ASSERT_NE(task, nullptr);
    EXPECT_EQ(task->name(), info.name);
  }
  EXPECT_EQ(names, (std::set<std::string>{"passkey", "ruler_niah", "variable_tracking", "common_words",
                                          "perplexity", "fidelity", "throughput"}));
  EXPECT_EQ(make("perplexity")->kind(), TaskKind::Perplexity);
  EXPECT_EQ(make("throughput")->kind(), TaskKind::Throughput);
  EXPECT_EQ(make("fidelity")->kind(), TaskKind::Fidelity);
  EXPECT_EQ(make("passkey")->kind(), TaskKind::Generation);
}

TEST(TaskCatalog, DepthsDefaultToStartMiddleAndEnd) {
  auto task = make_task("passkey", TaskParams{});
  ASSERT_TRUE(task.ok()) << task.message();
  for (const auto& info : task_catalog())
    for (const auto& p : info.params)
      if (p.spec.name == "depths") {
        EXPECT_EQ(p.default_values().size(), 3u) << info.name;
      }
}

TEST(TaskCatalog, UnknownTypeNamesTheKnownOnes) {
  expect_error(make_task("passkee", {}), {"unknown task 'passkee'", "passkey", "ruler_niah"});
}

TEST(TaskCatalog, BadParametersNameTheKey) {
  expect_error(make_task("passkey", params({{"lenghts", {int64_t{512}}}})), {"'lenghts'", "lengths"});
  expect_error(make_task("passkey", params({{"depths", {1.5}}})), {"'depths'", "1.5"});
  expect_error(make_task("passkey", params({{"lengths", {std::string("long")}}})), {"'lengths'", "int"});
  expect_error(make_task("passkey", params({{"samples", {int64_t{1}, int64_t{2}}}})), {"'samples'", "one value"});
  expect_error(make_task("passkey", params({{"lengths", {}}})), {"'lengths'", "empty"});
  expect_error(make_task("ruler_niah", params({{"variant", {std::string("triple")}}})),
               {"'variant'", "multikey"});
  expect_error(make_task("ruler_niah", params({{"num_needles", {int64_t{1}}}})), {"'num_needles'"});
}

TEST(TaskCatalog, LengthAboveMaxContextIsAnError) {
  auto task = make("passkey", params({{"lengths", {int64_t{512}, int64_t{4096}}}}));
  auto r = task->samples(*synthetic_tokenizer(), 2048, 1);
  ASSERT_FALSE(r.ok());
  EXPECT_NE(r.message().find("length 4096"), std::string::npos) << r.message();
  EXPECT_NE(r.message().find("max_context 2048"), std::string::npos) << r.message();
}

TEST(TaskCatalog, LengthTooShortForTheInstructionsIsAnError) {
  auto task = make("passkey", params({{"lengths", {int64_t{16}}}}));
  auto r = task->samples(*synthetic_tokenizer(), 2048, 1);
  ASSERT_FALSE(r.ok());
  EXPECT_NE(r.message().find("too short"), std::string::npos) << r.message();
}

TEST(TaskWords, ListIsUniqueLowercaseAndLongEnough) {
  const auto& words = tasks::word_list();
  EXPECT_GE(words.size(), 300u);
  EXPECT_EQ(std::set<std::string_view>(words.begin(), words.end()).size(), words.size());
  for (auto w : words)
    for (char c : w) EXPECT_TRUE(c >= 'a' && c <= 'z') << w;
}

// ---- scoring ------------------------------------------------------------------------

TEST(TaskScore, WholeAnswersOnly) {
  EXPECT_TRUE(contains_answer(" 12345.", "12345"));
  EXPECT_TRUE(contains_answer("The pass key is 12345", "12345"));
  EXPECT_TRUE(contains_answer("key:12345,", "12345"));
  EXPECT_FALSE(contains_answer("123456", "12345"));
  EXPECT_FALSE(contains_answer("012345", "12345"));
  EXPECT_FALSE(contains_answer("1234", "12345"));
  EXPECT_TRUE(contains_answer("123456 and 12345", "12345"));
  EXPECT_TRUE(contains_answer("APPLE, pear", "apple"));
  EXPECT_FALSE(contains_answer("apples", "apple"));
  EXPECT_FALSE(contains_answer("anything", ""));
}

TEST(TaskScore, PartialCreditIsTheFractionFound) {
  auto task = make("ruler_niah", params({{"variant", {std::string("multivalue")}}}));
  TaskSample s;
  s.expected = {"1111111", "2222222", "3333333", "4444444"};
  EXPECT_DOUBLE_EQ(task->score(s, "1111111, 2222222, 3333333 and 4444444."), 1.0);
  EXPECT_DOUBLE_EQ(task->score(s, "2222222 and 4444444"), 0.5);
  EXPECT_DOUBLE_EQ(task->score(s, "11111112"), 0.0);
  EXPECT_DOUBLE_EQ(make("perplexity")->score(s, "1111111"), 0.0);
}

// ---- passkey ------------------------------------------------------------------------------

TEST_P(TaskGeneration, PasskeyIsDeterministicInTheSeed) {
  auto task = make("passkey", params({{"lengths", {int64_t{256}}}, {"depths", {0.5}}, {"samples", {int64_t{3}}}}));
  const auto a = generate(*task, *tok_, 7), b = generate(*task, *tok_, 7), c = generate(*task, *tok_, 8);
  ASSERT_EQ(a.size(), 3u);
  ASSERT_EQ(a.size(), b.size());
  std::set<std::string> keys_a, keys_c;
  for (size_t i = 0; i < a.size(); ++i) {
    EXPECT_EQ(a[i].id, b[i].id);
    EXPECT_EQ(a[i].prompt_tokens, b[i].prompt_tokens);
    EXPECT_EQ(a[i].expected, b[i].expected);
    keys_a.insert(a[i].expected.at(0));
    keys_c.insert(c[i].expected.at(0));
  }
  EXPECT_EQ(keys_a.size(), 3u) << "samples of one (length, depth) should differ";
  EXPECT_NE(keys_a, keys_c);
  EXPECT_EQ(a[0].id, "len256-depth0.5-s0");
}

TEST_P(TaskGeneration, PasskeyPromptsFitTheLength) {
  auto task = make("passkey", params({{"lengths", {int64_t{160}, int64_t{512}, int64_t{1000}, int64_t{2048}}},
                                      {"depths", {0.0, 0.3, 1.0}},
                                      {"samples", {int64_t{2}}}}));
  const auto samples = generate(*task, *tok_);
  ASSERT_EQ(samples.size(), 4u * 3u * 2u);
  for (const auto& s : samples) {
    expect_length(s, std::stoll(s.id.substr(3)), 8);
    EXPECT_EQ(s.max_new_tokens, 8);
    ASSERT_EQ(s.expected.size(), 1u);
    EXPECT_TRUE(std::regex_match(s.expected[0], std::regex("[1-9][0-9]{4}"))) << s.expected[0];
    EXPECT_EQ(count_of(text(s), s.expected[0]), 1u) << s.id;
    if (tok_->add_bos_default()) {
      EXPECT_EQ(s.prompt_tokens.front(), tok_->bos());
    }
  }
}

TEST_P(TaskGeneration, PasskeySitsAtItsDepth) {
  auto task = make("passkey", params({{"lengths", {int64_t{1024}}}, {"depths", {0.0, 0.25, 0.5, 0.75, 1.0}}}));
  const auto samples = generate(*task, *tok_);
  ASSERT_EQ(samples.size(), 10u);
  std::map<double, std::vector<size_t>> position;  // depth -> token index of the key
  for (const auto& s : samples) {
    const std::string t = text(s);
    const size_t at = t.find(" The pass key is " + s.expected[0]);
    ASSERT_NE(at, std::string::npos) << s.id;
    position[s.tags.at("depth")].push_back(token_at(*tok_, s.prompt_tokens, at));
    if (s.tags.at("depth") == 0.0) {
      EXPECT_EQ(t.substr(at - 11, 11), "at the end.") << "no filler before the key";
    }
    if (s.tags.at("depth") == 1.0) {
      EXPECT_EQ(t.substr(t.find('.', at + 17) + 1, 14), " Remember it.\n") << "no filler after the key";
    }
  }
  for (size_t i = 0; i < 2; ++i) {
    const double start = double(position[0.0][i]), end = double(position[1.0][i]);
    for (double depth : {0.25, 0.5, 0.75})
      EXPECT_NEAR((double(position[depth][i]) - start) / (end - start), depth, 0.05) << depth;
  }
}

TEST_P(TaskGeneration, DecodedQuestionMarksTheQuestionTokens) {
  auto base = params({{"lengths", {int64_t{256}, int64_t{700}}}, {"depths", {0.0, 1.0}}});
  auto decoded = base;
  decoded.set("question", {std::string("decode")});
  const auto prefilled = generate(*make("passkey", base), *tok_);
  const auto fed = generate(*make("passkey", decoded), *tok_);
  ASSERT_EQ(prefilled.size(), fed.size());
  for (size_t i = 0; i < fed.size(); ++i) {
    const TaskSample& s = fed[i];
    EXPECT_EQ(prefilled[i].question_tokens, 0) << "question = prefill is the default";
    EXPECT_EQ(s.prompt_tokens, prefilled[i].prompt_tokens) << "the protocol does not change the prompt";
    ASSERT_GT(s.question_tokens, 0) << s.id;
    ASSERT_LT(size_t(s.question_tokens), s.prompt_tokens.size());
    const auto split = s.prompt_tokens.end() - s.question_tokens;
    const std::string question = tok_->decode({split, s.prompt_tokens.end()});
    const std::string context = tok_->decode({s.prompt_tokens.begin(), split});
    EXPECT_TRUE(question.ends_with("What is the pass key? The pass key is")) << question;
    EXPECT_LE(question.size(), std::string("\nWhat is the pass key? The pass key is").size() + 4) << question;
    EXPECT_EQ(context.find("What is the pass key?"), std::string::npos);
    EXPECT_EQ(count_of(context, s.expected[0]), 1u) << "the key stays in the prefilled context";
  }
}

TEST_P(TaskGeneration, AnswersToTeacherForceAreTheAskedContinuation) {
  for (const auto& s : generate(*make("passkey", params({{"lengths", {int64_t{256}}}})), *tok_))
    EXPECT_EQ(s.answer, " " + s.expected.at(0));
  auto off = params({{"lengths", {int64_t{256}}}, {"answer_logprob", {false}}});
  for (const auto& s : generate(*make("passkey", off), *tok_)) EXPECT_TRUE(s.answer.empty());
  for (const char* variant : {"single", "multikey"})
    for (const auto& s : generate(*make("ruler_niah", params({{"variant", {std::string(variant)}},
                                                              {"lengths", {int64_t{512}}}})),
                                  *tok_))
      EXPECT_EQ(s.answer, " " + s.expected.at(0)) << variant;
  // Several values in any order: no single continuation.
  for (const auto& s : generate(*make("ruler_niah", params({{"variant", {std::string("multivalue")}},
                                                            {"lengths", {int64_t{512}}}})),
                                *tok_))
    EXPECT_TRUE(s.answer.empty());
}

// ---- RULER needle in a haystack ---------------------------------------------------------------

struct Needles {
  std::vector<std::pair<std::string, std::string>> found;  // (key, value) in prompt order
  std::string asked;                                       // key in the question
};

Needles parse_needles(const std::string& text) {
  Needles n;
  static const std::regex needle("One of the special magic numbers for ([a-z]+-[a-z]+) is: ([0-9]+)\\.");
  static const std::regex question("special magic numbers? for ([a-z]+-[a-z]+) mentioned");
  for (const auto& m : all_matches(text, needle)) n.found.emplace_back(m[1], m[2]);
  std::smatch q;
  if (std::regex_search(text, q, question)) n.asked = q[1];
  return n;
}

TEST_P(TaskGeneration, NiahSingleAsksForItsNeedle) {
  auto task = make("ruler_niah", params({{"lengths", {int64_t{300}, int64_t{1500}}}, {"depths", {0.0, 0.5, 1.0}}}));
  for (const auto& s : generate(*task, *tok_)) {
    expect_length(s, std::stoll(s.id.substr(3)), 8);
    const Needles n = parse_needles(text(s));
    ASSERT_EQ(n.found.size(), 1u) << s.id;
    EXPECT_EQ(n.asked, n.found[0].first);
    EXPECT_EQ(s.expected, std::vector<std::string>{n.found[0].second});
    EXPECT_EQ(s.expected[0].size(), 7u);
    EXPECT_EQ(count_of(text(s), s.expected[0]), 1u);
    EXPECT_GE(s.max_new_tokens, 7);
  }
}

TEST_P(TaskGeneration, NiahMultikeyHasDistinctDistractors) {
  auto task = make("ruler_niah", params({{"variant", {std::string("multikey")}},
                                         {"lengths", {int64_t{1024}}},
                                         {"depths", {0.0, 1.0}},
                                         {"num_needles", {int64_t{5}}}}));
  for (const auto& s : generate(*task, *tok_)) {
    expect_length(s, 1024, 8);
    const Needles n = parse_needles(text(s));
    ASSERT_EQ(n.found.size(), 5u) << s.id;
    std::set<std::string> keys, values;
    for (const auto& [k, v] : n.found) keys.insert(k), values.insert(v);
    EXPECT_EQ(keys.size(), 5u);
    EXPECT_EQ(values.size(), 5u);
    // The asked needle is the target: first at depth 0, last at depth 1.
    const auto& target = s.tags.at("depth") == 0.0 ? n.found.front() : n.found.back();
    EXPECT_EQ(n.asked, target.first) << s.id;
    EXPECT_EQ(s.expected, std::vector<std::string>{target.second});
  }
}

TEST_P(TaskGeneration, NiahMultivalueExpectsEveryValue) {
  auto task = make("ruler_niah", params({{"variant", {std::string("multivalue")}},
                                         {"lengths", {int64_t{1024}}},
                                         {"num_needles", {int64_t{3}}}}));
  const int32_t single_budget = generate(*make("ruler_niah"), *tok_).at(0).max_new_tokens;
  for (const auto& s : generate(*task, *tok_)) {
    const Needles n = parse_needles(text(s));
    ASSERT_EQ(n.found.size(), 3u) << s.id;
    std::set<std::string> values;
    for (const auto& [k, v] : n.found) {
      EXPECT_EQ(k, n.asked);
      values.insert(v);
    }
    EXPECT_EQ(values, std::set<std::string>(s.expected.begin(), s.expected.end()));
    EXPECT_EQ(s.expected.size(), 3u);
    EXPECT_GT(s.max_new_tokens, single_budget);
  }
}

// ---- variable tracking ------------------------------------------------------------------------

TEST_P(TaskGeneration, VariableTrackingExpectsTheWholeChain) {
  auto task = make("variable_tracking", params({{"lengths", {int64_t{600}, int64_t{2000}}},
                                                {"num_chains", {int64_t{3}}},
                                                {"num_hops", {int64_t{4}}}}));
  const auto samples = generate(*task, *tok_);
  ASSERT_EQ(samples.size(), 8u);
  static const std::regex statement("VAR ([A-Z]{5}) = (?:VAR ([A-Z]{5})|([0-9]+))\\.");
  static const std::regex question("assigned the value ([0-9]+) in the text");
  for (const auto& s : samples) {
    expect_length(s, std::stoll(s.id.substr(3)), 8);
    const std::string t = text(s);
    std::map<std::string, std::string> value_of;
    for (const auto& m : all_matches(t, statement)) {
      ASSERT_EQ(value_of.count(m[1]), 0u) << "assigned twice: " << m[1];
      const std::string source = m[2].matched ? value_of[m[2]] : std::string(m[3]);
      ASSERT_FALSE(source.empty()) << m[2] << " used before it is assigned";
      value_of[m[1]] = source;
    }
    EXPECT_EQ(value_of.size(), 15u);
    std::smatch q;
    ASSERT_TRUE(std::regex_search(t, q, question));
    std::set<std::string> holding;
    for (const auto& [var, value] : value_of)
      if (value == q[1]) holding.insert(var);
    EXPECT_EQ(holding, std::set<std::string>(s.expected.begin(), s.expected.end())) << s.id;
    EXPECT_EQ(s.expected.size(), 5u);
  }
}

// ---- common words -------------------------------------------------------------------------------

TEST_P(TaskGeneration, CommonWordsExpectsTheMostFrequent) {
  auto task = make("common_words", params({{"lengths", {int64_t{512}, int64_t{4000}}}, {"top_k", {int64_t{4}}}}));
  const auto samples = generate(*task, *tok_);
  ASSERT_EQ(samples.size(), 8u);
  static const std::regex entry("\n([0-9]+)\\. ([a-z]+)");
  for (const auto& s : samples) {
    expect_length(s, std::stoll(s.id.substr(3)), 12);
    std::map<std::string, int> counts;
    int number = 0;
    const std::string t = text(s);
    for (const auto& m : all_matches(t, entry)) {
      EXPECT_EQ(std::stoi(m[1]), ++number);
      ++counts[m[2]];
    }
    ASSERT_EQ(s.expected.size(), 4u);
    int least_common = 1 << 30, most_other = 0;
    for (const auto& [word, n] : counts) {
      if (std::find(s.expected.begin(), s.expected.end(), word) != s.expected.end())
        least_common = std::min(least_common, n);
      else
        most_other = std::max(most_other, n);
    }
    for (const auto& w : s.expected) EXPECT_GT(counts[w], 0) << w;
    EXPECT_GT(least_common, most_other) << s.id;
    EXPECT_GT(counts.size(), 4u + 10u) << "uncommon words fill the rest of the list";
  }
}

// ---- corpus tasks --------------------------------------------------------------------------------

// A corpus of numbered lines, so any two segments that overlapped would share text.
std::filesystem::path write_corpus(int lines) {
  const auto path = test::temp_path("corpus.txt");
  std::ofstream out(path);
  for (int i = 0; i < lines; ++i) out << "Line " << i << " of the small test corpus, about a quiet river.\n";
  return path;
}

TEST(TaskCorpus, PerplexitySegmentsAreDisjointAndDeterministic) {
  const Tokenizer& tok = *synthetic_tokenizer();
  const auto path = write_corpus(2000);
  auto task = make("perplexity", params({{"path", {path.string()}},
                                         {"length", {int64_t{128}}},
                                         {"samples", {int64_t{6}}},
                                         {"chunk", {int64_t{32}}}}));
  EXPECT_EQ(task->chunk_tokens(), 32);
  const auto a = generate(*task, tok, 3), b = generate(*task, tok, 3), c = generate(*task, tok, 4);
  ASSERT_EQ(a.size(), 6u);
  std::ifstream in(path);
  const std::string all((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  const auto corpus = tok.encode(all, false, false);
  const size_t bos = tok.add_bos_default() ? 1 : 0, body = 128 - bos;
  for (size_t i = 0; i < a.size(); ++i) {
    ASSERT_EQ(a[i].prompt_tokens.size(), 128u);
    EXPECT_EQ(a[i].prompt_tokens, b[i].prompt_tokens);
    EXPECT_TRUE(a[i].expected.empty() && a[i].target_tokens.empty());
    const auto offset = size_t(a[i].tags.at("offset"));
    if (i > 0) {
      EXPECT_GE(offset, size_t(a[i - 1].tags.at("offset")) + body) << "segments overlap";
    }
    EXPECT_TRUE(std::equal(a[i].prompt_tokens.begin() + long(bos), a[i].prompt_tokens.end(),
                           corpus.begin() + long(offset)))
        << "segment " << i << " is not the corpus at its offset";
  }
  std::vector<double> offsets_a, offsets_c;
  for (size_t i = 0; i < a.size(); ++i)
    offsets_a.push_back(a[i].tags.at("offset")), offsets_c.push_back(c[i].tags.at("offset"));
  EXPECT_NE(offsets_a, offsets_c);
}

TEST(TaskCorpus, MissingOrShortCorpusIsAnError) {
  const Tokenizer& tok = *synthetic_tokenizer();
  auto missing = make("perplexity", params({{"path", {std::string("/nonexistent/corpus.txt")}}}));
  auto r = missing->samples(tok, 4096, 1);
  ASSERT_FALSE(r.ok());
  EXPECT_NE(r.message().find("/nonexistent/corpus.txt"), std::string::npos) << r.message();
  EXPECT_NE(r.message().find("fetch-corpus.sh"), std::string::npos) << r.message();

  auto small = make("perplexity", params({{"path", {write_corpus(3).string()}}}));
  r = small->samples(tok, 4096, 1);
  ASSERT_FALSE(r.ok());
  EXPECT_NE(r.message().find("need"), std::string::npos) << r.message();

  auto long_sample = make("perplexity", params({{"length", {int64_t{8192}}}}));
  r = long_sample->samples(tok, 4096, 1);
  ASSERT_FALSE(r.ok());
  EXPECT_NE(r.message().find("max_context 4096"), std::string::npos) << r.message();
}

TEST(TaskCorpus, KjvResolvesInTheCorpusDirectory) {
  const char* old = std::getenv("INFERLAB_CORPUS_DIR");
  const std::string saved = old != nullptr ? old : "";
  const auto dir = test::temp_path("corpora");
  std::filesystem::create_directories(dir);
  ::setenv("INFERLAB_CORPUS_DIR", dir.c_str(), 1);
  auto missing = resolve_corpus("kjv");
  std::ofstream(dir / "kjv.txt") << "In the beginning.\n";
  auto present = resolve_corpus("kjv");
  if (old != nullptr) ::setenv("INFERLAB_CORPUS_DIR", saved.c_str(), 1);
  else ::unsetenv("INFERLAB_CORPUS_DIR");
  ASSERT_FALSE(missing.ok());
  EXPECT_NE(missing.message().find((dir / "kjv.txt").string()), std::string::npos) << missing.message();
  EXPECT_NE(missing.message().find("scripts/fetch-corpus.sh"), std::string::npos) << missing.message();
  ASSERT_TRUE(present.ok()) << present.message();
  EXPECT_EQ(*present, dir / "kjv.txt");
}

TEST(TaskCorpus, FidelityPromptsComeFromTheCorpus) {
  const Tokenizer& tok = *synthetic_tokenizer();
  const auto path = write_corpus(1000);
  auto task = make("fidelity", params({{"path", {path.string()}},
                                       {"prompt_tokens", {int64_t{64}}},
                                       {"samples", {int64_t{3}}},
                                       {"new_tokens", {int64_t{16}}}}));
  const auto samples = generate(*task, tok);
  ASSERT_EQ(samples.size(), 3u);
  std::set<std::vector<int32_t>> distinct;
  for (const auto& s : samples) {
    EXPECT_EQ(s.prompt_tokens.size(), 64u);
    EXPECT_EQ(s.max_new_tokens, 16);
    EXPECT_NE(tok.decode(s.prompt_tokens).find("small test corpus"), std::string::npos);
    distinct.insert(s.prompt_tokens);
  }
  EXPECT_EQ(distinct.size(), 3u);
  auto r = task->samples(tok, 70, 1);
  ASSERT_FALSE(r.ok());
  EXPECT_NE(r.message().find("max_context 70"), std::string::npos) << r.message();
}

TEST(TaskCorpus, RealCorpusWithTheRealTokenizer) {
  const Tokenizer* tok = real_tokenizer();
  if (!tok) GTEST_SKIP() << "default model not installed (scripts/fetch-model.sh)";
  if (!resolve_corpus("kjv").ok()) GTEST_SKIP() << "corpus not installed (scripts/fetch-corpus.sh)";
  const auto samples = generate(*make("perplexity"), *tok);
  ASSERT_EQ(samples.size(), 4u);
  for (const auto& s : samples) EXPECT_EQ(s.prompt_tokens.size(), 512u);
  EXPECT_NE(tok->decode(samples[0].prompt_tokens).find(" the "), std::string::npos);
}

}  // namespace test_tasks
}  // namespace inferlab
