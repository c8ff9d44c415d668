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
#include "search.h"

#include <cmath>
#include <numeric>
#include <random>
#include <set>

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
      {"[{\"0\": [\"stream_llm\", 1, 30e6096, 0.5]}]", "not valid JSON"},  // a number past double (found by fuzzing)
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
    EXPECT_DENSE_EQUIVALENT(model(), "minference",
                            test::params({{"default_pattern", std::string(pattern)}, {"search", std::string("off")}}));
}

TEST(MInference, SmallBudgetsReadFewerKeysThanDense) {
  auto engine = Engine::create(model(), EngineOptions{4, 0, 0});
  ASSERT_TRUE(engine.ok());
  const auto prompt = test::random_tokens(model()->config().n_vocab, 300, 9);
  for (const char* pattern : {"vertical_and_slash", "stream_llm", "block_sparse"}) {
    SCOPED_TRACE(pattern);
    auto active = test::activate_method(**engine, "minference",
                                        test::params({{"default_pattern", std::string(pattern)},
                                                      {"search", std::string("off")},
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


// --- the offline search -------------------------------------------------------

// Recall by the definition of each kind, in double, for random queries and keys.
TEST(MInferenceSearch, RecallOfEachCandidateMatchesTheDefinition) {
  const int64_t n = 200, hd = 8, bs = 16;
  std::mt19937 rng(3);
  std::normal_distribution<float> normal(0.0f, 1.5f);
  std::vector<float> q(size_t(n * hd)), k(size_t(n * hd));
  for (auto* v : {&q, &k})
    for (float& x : *v) x = normal(rng);
  mi::SearchOptions o;
  o.block = int32_t(bs);
  o.last_q = 20;
  o.keep_first_columns = 3;
  o.keep_last_diagonals = 2;
  o.skip_rows = 50;
  const std::vector<mi::Candidate> cands = {{mi::HeadType::StreamLlm, 5, 20},   {mi::HeadType::VerticalSlash, 4, 6},
                                            {mi::HeadType::VerticalSlash, 12, 3}, {mi::HeadType::BlockSparse, 3, 0},
                                            {mi::HeadType::StreamLlm, 40, 8}};
  const auto got = mi::candidate_recall(q.data(), hd, k.data(), hd, n, hd, cands, o);

  // Dense probabilities.
  std::vector<std::vector<double>> p(static_cast<size_t>(n));
  for (int64_t t = 0; t < n; ++t) {
    for (int64_t j = 0; j <= t; ++j) {
      double d = 0;
      for (int64_t i = 0; i < hd; ++i) d += double(q[size_t(t * hd + i)]) * k[size_t(j * hd + i)];
      p[size_t(t)].push_back(d / std::sqrt(double(hd)));
    }
    const double m = *std::max_element(p[size_t(t)].begin(), p[size_t(t)].end());
    double sum = 0;
    for (double& x : p[size_t(t)]) sum += (x = std::exp(x - m));
    for (double& x : p[size_t(t)]) x /= sum;
  }
  auto best = [](const std::vector<double>& s, int64_t kk) {
    std::vector<int64_t> idx(s.size());
    std::iota(idx.begin(), idx.end(), 0);
    std::stable_sort(idx.begin(), idx.end(), [&](int64_t a, int64_t b) { return s[size_t(a)] > s[size_t(b)]; });
    idx.resize(size_t(std::min<int64_t>(kk, int64_t(idx.size()))));
    return std::set<int64_t>(idx.begin(), idx.end());
  };
  std::vector<double> vertical(size_t(n), 0.0), slash(size_t(n), 0.0);
  for (int64_t t = n - o.last_q; t < n; ++t)
    for (int64_t j = 0; j <= t; ++j) {
      vertical[size_t(j)] += p[size_t(t)][size_t(j)];
      slash[size_t(t - j)] += p[size_t(t)][size_t(j)];
    }
  for (int64_t j = 0; j < o.keep_first_columns; ++j) vertical[size_t(j)] = 1e9;
  for (int64_t d = 0; d < o.keep_last_diagonals; ++d) slash[size_t(d)] = 1e9;
  for (size_t c = 0; c < cands.size(); ++c) {
    const mi::Candidate& cand = cands[c];
    std::set<int64_t> cols, diags;
    if (cand.type == mi::HeadType::VerticalSlash) cols = best(vertical, cand.a), diags = best(slash, cand.b);
    double total = 0;
    for (int64_t t = o.skip_rows; t < n; ++t) {
      const int64_t q0 = t / bs * bs, q1 = q0 + bs;
      std::set<int64_t> blocks;
      if (cand.type == mi::HeadType::BlockSparse) {
        std::vector<double> s;
        for (int64_t kb = 0; kb <= t / bs; ++kb) {
          double d = 0;
          for (int64_t i = 0; i < hd; ++i) {
            double mq = 0, mk = 0;
            for (int64_t r = q0; r < std::min(q1, n); ++r) mq += q[size_t(r * hd + i)] / double(std::min(q1, n) - q0);
            for (int64_t r = kb * bs; r < std::min(kb * bs + bs, n); ++r)
              mk += k[size_t(r * hd + i)] / double(std::min(kb * bs + bs, n) - kb * bs);
            d += mq * mk;
          }
          s.push_back(d);
        }
        blocks = best(s, cand.a);
      }
      for (int64_t j = 0; j <= t; ++j) {
        bool in = false;
        if (cand.type == mi::HeadType::StreamLlm) in = j < cand.a || j >= q0 - cand.b;
        if (cand.type == mi::HeadType::BlockSparse) in = blocks.count(j / bs) > 0;
        if (cand.type == mi::HeadType::VerticalSlash) {
          in = cols.count(j) > 0;
          for (int64_t d : diags) in = in || (j >= q0 - d && j < q1 - d);
        }
        if (in) total += p[size_t(t)][size_t(j)];
      }
    }
    EXPECT_NEAR(got[c], total / double(n - o.skip_rows), 1e-4) << "candidate " << c;
    EXPECT_GT(got[c], 0.0);
    EXPECT_LT(got[c], 1.0);
  }
}

TEST(MInferenceSearch, TheBestRecallWinsAndRelabellingFollowsTheReference) {
  const auto cands = mi::reference_candidates(1.0, 4096, 64);
  ASSERT_EQ(cands.size(), 6u);
  EXPECT_EQ(cands[0].type, mi::HeadType::StreamLlm);
  EXPECT_EQ(cands[5].a, 8);  // 64 blocks, 1/8 kept
  std::vector<double> recall = {0.9, 0.5, 0.6, 0.7, 0.8, 0.95};
  mi::HeadPattern p = mi::choose(cands, recall, false, 1.0);
  EXPECT_EQ(p.type, mi::HeadType::BlockSparse);
  EXPECT_DOUBLE_EQ(p.score, 0.95);
  p = mi::choose(cands, recall, true, 1.0);  // block_sparse -> vertical_and_slash (1000, 6096)
  EXPECT_EQ(p.type, mi::HeadType::VerticalSlash);
  EXPECT_EQ(p.a, 1000);
  EXPECT_EQ(p.b, 6096);
  recall = {0.99, 0.5, 0.6, 0.7, 0.8, 0.95};
  p = mi::choose(cands, recall, true, 1.0);  // stream_llm -> vertical_and_slash with its numbers
  EXPECT_EQ(p.type, mi::HeadType::VerticalSlash);
  EXPECT_EQ(p.a, 100);
  EXPECT_EQ(p.b, 800);
}

// The search as the host runs it: calibration passes, the file in the
// artifact folder, every head given a pattern.
TEST(MInferenceSearch, TheSearchWritesAPatternFileTheMethodThenUses) {
  auto engine = Engine::create(model(), EngineOptions{4, 0, 0});
  ASSERT_TRUE(engine.ok());
  auto active = test::activate_method(**engine, "minference",
                                      test::params({{"search_tokens", int64_t{256}}, {"search_skip_rows", int64_t{64}},
                                                    {"kernel_block", int64_t{16}}, {"reference_context", int64_t{2048}}}));
  ASSERT_NE(active.handle.get(), nullptr);
  const auto counters = active.handle->counters();
  EXPECT_EQ(counters.at("heads_vertical_and_slash") + counters.at("heads_stream_llm") + counters.at("heads_block_sparse"),
            2 * 4);
  const auto trace = test::run_trace(**engine, active.handle.get(), test::random_tokens(model()->config().n_vocab, 300, 5), 0);
  EXPECT_EQ((*engine)->counters().sparse_prefill_heads, 2 * 4);
}

}  // namespace
}  // namespace inferlab
