// MInference: the pattern file in the reference's JSON layout (read, written,
// refused when wrong), the patterns the plugin gives the engine per head, and
// the engine results it leads to: dense when the budgets cover everything,
// really sparse (keys read below the causal count) when they do not.
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <sstream>

#include "inferlab/testing.h"
#include "pattern_file.h"

namespace inferlab {
namespace {

namespace mi = minference;

std::shared_ptr<Model> model() { return test::gqa_test_model("minference", 4); }  // 2 layers, 4 query heads

const std::filesystem::path kFixture = std::filesystem::path(__FILE__).parent_path() / "data" / "reference_layout.json";

std::string read_text(const std::filesystem::path& path) {
  std::ifstream in(path);
  std::stringstream s;
  s << in.rdbuf();
  return s.str();
}

std::string write_temp(const std::string& name, const std::string& text) {
  const auto path = test::temp_path(name);
  std::ofstream(path) << text;
  return path.string();
}

TEST(MInferencePatternFile, TheReferenceLayoutRoundTrips) {
  auto file = mi::read_pattern_file(kFixture.string(), 2, 4);
  ASSERT_TRUE(file.ok()) << file.message();
  ASSERT_EQ(file->layers.size(), 2u);
  const mi::HeadPattern& vs = file->layers[0][0];
  EXPECT_EQ(vs.type, mi::HeadType::VerticalSlash);
  EXPECT_EQ(vs.a, 1000);
  EXPECT_EQ(vs.b, 6096);
  EXPECT_DOUBLE_EQ(vs.score, 0.9296875);
  EXPECT_EQ(file->layers[0][1].type, mi::HeadType::StreamLlm);
  EXPECT_EQ(file->layers[0][2].type, mi::HeadType::BlockSparse);
  EXPECT_EQ(file->layers[1][2].a, 3500);
  // Written back byte for byte in the reference's layout (Python json.dump spacing, one line).
  EXPECT_EQ(mi::format_pattern_file(*file), read_text(kFixture));
  const auto copy = test::temp_path("copy.json").string();
  ASSERT_TRUE(mi::write_pattern_file(copy, *file).ok());
  EXPECT_EQ(read_text(copy), read_text(kFixture));
}

TEST(MInferencePatternFile, WrongFilesAreRefusedWithTheFileAndThePlaceAtFault) {
  struct Case {
    const char* text;
    const char* expect;
  };
  const Case cases[] = {
      {"[{\"0\": [\"vertical_and_slash\", 1, 2, 0.5]", "line 1, column"},            // cut short
      {"{\"0\": []}", "expected a JSON list"},
      {"[{}]", "1 layers, but the model has 2"},
      {"[{\"0\": [\"vertical_and_slash\", 1, 2, 0.5]}, {}]", "layer 0: 1 heads, but the model has 4"},
      {"[{\"0\": [\"diagonal\", 1, 2, 0.5], \"1\": [\"stream_llm\", 1, 2, 0], \"2\": [\"stream_llm\", 1, 2, 0], "
       "\"3\": [\"stream_llm\", 1, 2, 0]}, {}]",
       "layer 0, head \"0\": unknown type \"diagonal\""},
      {"[{\"0\": [\"stream_llm\", -1, 2, 0.5], \"1\": [\"stream_llm\", 1, 2, 0], \"2\": [\"stream_llm\", 1, 2, 0], "
       "\"3\": [\"stream_llm\", 1, 2, 0]}, {}]",
       "budgets a and b must be whole numbers >= 0"},
      {"[{\"a\": [\"stream_llm\", 1, 2, 0.5], \"1\": [\"stream_llm\", 1, 2, 0], \"2\": [\"stream_llm\", 1, 2, 0], "
       "\"3\": [\"stream_llm\", 1, 2, 0]}, {}]",
       "head \"a\": a head key must be a query head index 0..3"},
      {"[{\"0\": [\"stream_llm\", 1.5, 2, 0.5], \"1\": [\"stream_llm\", 1, 2, 0], \"2\": [\"stream_llm\", 1, 2, 0], "
       "\"3\": [\"stream_llm\", 1, 2, 0]}, {}]",
       "whole numbers"},
      {"[{\"0\": \"vertical_and_slash\", \"1\": [\"stream_llm\", 1, 2, 0], \"2\": [\"stream_llm\", 1, 2, 0], "
       "\"3\": [\"stream_llm\", 1, 2, 0]}, {}]",
       "expected [type, a, b, score]"},
  };
  for (const Case& c : cases) {
    auto file = mi::parse_pattern_file(c.text, "p.json", 2, 4);
    ASSERT_FALSE(file.ok()) << c.text;
    EXPECT_EQ(file.message().rfind("p.json: ", 0), 0u) << file.message();
    EXPECT_NE(file.message().find(c.expect), std::string::npos) << file.message();
  }
  EXPECT_NE(mi::read_pattern_file("/nonexistent/p.json", 2, 4).message().find("/nonexistent/p.json: cannot open"),
            std::string::npos);
}

// The method as the host loads it, with the shape and checksum of `model()`.
MethodHandle loaded(const ParamValues& params, Status* status = nullptr, const std::string& checksum = "abc") {
  MethodHandle m = test::make_method("minference", params);
  if (m.get() == nullptr) return m;
  LoadContext context;
  context.shape = ModelShape{2, 4, 2, 16, 64, 128, 256, 4096, 4};
  context.model_checksum = checksum;
  const Status s = m->on_load(context);
  if (status != nullptr) *status = s;
  else EXPECT_TRUE(s.ok()) << (s.ok() ? "" : s.message());
  return m;
}

TEST(MInference, FileHeadsBecomeTheEnginesPatternsWithTheReferencesFloors) {
  MethodHandle m = loaded(test::params({{"config", kFixture.string()}, {"kernel_block", int64_t{16}}}));
  ASSERT_NE(m.get(), nullptr);
  const StepInfo prefill{0, 0, 3000, 1, nullptr};
  PrefillPattern p;
  ASSERT_TRUE(m->prefill_pattern(prefill, 0, 0, p));  // vertical_and_slash 1000 / 6096: the slashes capped at the context
  EXPECT_EQ(p.kind, PrefillPattern::Kind::VerticalSlash);
  EXPECT_EQ(p.block_size, 16);
  EXPECT_EQ(p.verticals, 1000);
  EXPECT_EQ(p.slashes, 3000);
  EXPECT_EQ(p.last_q, 64);
  ASSERT_TRUE(m->prefill_pattern(prefill, 0, 3, p));  // 30 / 50: the floors
  EXPECT_EQ(p.verticals, 30);
  EXPECT_EQ(p.slashes, 50);
  ASSERT_TRUE(m->prefill_pattern(prefill, 0, 1, p));
  EXPECT_EQ(p.kind, PrefillPattern::Kind::AShape);
  EXPECT_EQ(p.sink, 100);
  EXPECT_EQ(p.local, 800);
  ASSERT_TRUE(m->prefill_pattern(prefill, 0, 2, p));
  EXPECT_EQ(p.kind, PrefillPattern::Kind::BlockTopK);
  EXPECT_EQ(p.top_k, 100);  // block_top_k; the file's a and b are not read, as in the reference
  EXPECT_FALSE(m->prefill_pattern(StepInfo{5, 3000, 1, 1, nullptr}, 0, 0, p));  // decode stays dense
  const auto counters = m->counters();
  EXPECT_EQ(counters.at("heads_vertical_and_slash"), 4);
  EXPECT_EQ(counters.at("heads_stream_llm"), 2);
  EXPECT_EQ(counters.at("heads_block_sparse"), 2);
}

TEST(MInference, BudgetsScaleWithTheContextAndShortOrEarlyLayersStayDense) {
  MethodHandle m = loaded(test::params({{"config", kFixture.string()}, {"reference_context", int64_t{131072}},
                                        {"min_context", int64_t{1024}}, {"dense_layers", int64_t{1}}}));
  ASSERT_NE(m.get(), nullptr);
  PrefillPattern p;
  EXPECT_FALSE(m->prefill_pattern(StepInfo{0, 0, 1000, 1, nullptr}, 1, 1, p));  // below min_context
  EXPECT_FALSE(m->prefill_pattern(StepInfo{0, 0, 8192, 1, nullptr}, 0, 1, p));  // a dense layer
  ASSERT_TRUE(m->prefill_pattern(StepInfo{0, 0, 8192, 1, nullptr}, 1, 1, p));   // 64 / 512 at 128K -> 4 / 32 at 8K
  EXPECT_EQ(p.verticals, 30);  // floors
  EXPECT_EQ(p.slashes, 50);
  ASSERT_TRUE(m->prefill_pattern(StepInfo{0, 0, 8192, 1, nullptr}, 1, 2, p));  // 3500 / 100 -> 219 / 7
  EXPECT_EQ(p.verticals, 219);
  EXPECT_EQ(p.slashes, 50);
  ASSERT_TRUE(m->prefill_pattern(StepInfo{0, 0, 8192, 1, nullptr}, 1, 0, p));  // stream_llm 128 / 3968 -> 8 / 248
  EXPECT_EQ(p.sink, 8);
  EXPECT_EQ(p.local, 248);
}

TEST(MInference, AFileSearchedOnAnotherModelIsRefusedUnlessAllowed) {
  const std::string file = write_temp("searched.json", read_text(kFixture));
  std::ofstream(file + ".meta.json") << R"({"model_checksum": "0123456789abcdef"})";
  Status status = ok_status();
  loaded(test::params({{"config", file}}), &status, "fedcba9876543210");
  ASSERT_FALSE(status.ok());
  EXPECT_NE(status.message().find("searched on another model"), std::string::npos) << status.message();
  EXPECT_NE(status.message().find("allow_other_model"), std::string::npos);
  loaded(test::params({{"config", file}, {"allow_other_model", true}}), &status, "fedcba9876543210");
  EXPECT_TRUE(status.ok());
  loaded(test::params({{"config", file}}), &status, "0123456789abcdef");
  EXPECT_TRUE(status.ok());
  // A file of another shape is refused at load.
  const std::string small = write_temp("small.json", "[{\"0\": [\"stream_llm\", 1, 2, 0]}]");
  loaded(test::params({{"config", small}}), &status);
  ASSERT_FALSE(status.ok());
  EXPECT_NE(status.message().find("1 layers, but the model has 2"), std::string::npos) << status.message();
}

TEST(MInference, BudgetsCoveringThePromptAreDense) {
  for (const char* pattern : {"vertical_and_slash", "stream_llm", "block_sparse"})
    EXPECT_DENSE_EQUIVALENT(model(), "minference", test::params({{"default_pattern", std::string(pattern)}}));
}

TEST(MInference, SmallBudgetsReadFewerKeysThanDense) {
  auto engine = Engine::create(model(), EngineOptions{4, 0, 0});
  ASSERT_TRUE(engine.ok());
  const auto prompt = test::random_tokens(model()->config().n_vocab, 300, 9);
  for (const char* pattern : {"vertical_and_slash", "stream_llm", "block_sparse"}) {
    SCOPED_TRACE(pattern);
    auto active = test::activate_method(**engine, "minference",
                                        test::params({{"default_pattern", std::string(pattern)},
                                                      {"vertical", int64_t{0}},  // the floors: 30 and 50
                                                      {"slash", int64_t{0}},
                                                      {"n_init", int64_t{4}},
                                                      {"n_local", int64_t{32}},
                                                      {"block_top_k", int64_t{3}},
                                                      {"kernel_block", int64_t{16}}}));
    ASSERT_NE(active.handle.get(), nullptr);
    (*engine)->reset_counters();
    const auto trace = test::run_trace(**engine, active.handle.get(), prompt, 0);
    ASSERT_EQ(trace.logits.size(), prompt.size() * size_t(model()->config().n_vocab));
    const auto& c = (*engine)->counters();
    EXPECT_EQ(c.sparse_prefill_heads, 2 * 4);
    EXPECT_GT(c.sparse_prefill_keys_read, 0);
    EXPECT_LT(c.sparse_prefill_keys_read, c.sparse_prefill_keys_causal * 3 / 4);
    (void)(*engine)->set_method(nullptr, 0);
  }
}

}  // namespace
}  // namespace inferlab
