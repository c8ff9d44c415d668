// MInference: the pattern file in the reference's JSON layout (read, written,
// refused when wrong), the patterns the plugin gives the engine per head, and
// the engine results it leads to: dense when the budgets cover everything,
// really sparse (keys read below the causal count) when they do not; the
// offline searches (recall and output) against their definitions in double.
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <sstream>

#include "datasets/tasks.h"
#include "inferlab/testing.h"
#include "pattern_file.h"
#include "search.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <random>
#include <set>

namespace inferlab {
namespace test_minference {

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

// The indices of the kk largest of s (ties to the lower index).
std::set<int64_t> best_of(const std::vector<double>& s, int64_t kk) {
  std::vector<int64_t> idx(s.size());
  std::iota(idx.begin(), idx.end(), 0);
  std::stable_sort(idx.begin(), idx.end(), [&](int64_t a, int64_t b) { return s[size_t(a)] > s[size_t(b)]; });
  idx.resize(size_t(std::min<int64_t>(kk, int64_t(idx.size()))));
  return std::set<int64_t>(idx.begin(), idx.end());
}

// One head of random queries, keys and values, and the keys each candidate
// keeps by the definition of its kind, in double. The rows hold two heads
// (stride 2 * hd); the searches read the second.
struct DefinedHead {
  static constexpr int64_t n = 200, hd = 8, bs = 16, stride = 2 * hd;
  mi::SearchOptions o;
  std::vector<float> q, k, v;
  std::vector<std::vector<double>> p;  // dense probabilities: p[t][j], j <= t
  std::vector<double> vertical, slash;

  DefinedHead() : q(size_t(n * stride)), k(q.size()), v(q.size()), p(size_t(n)), vertical(size_t(n)), slash(size_t(n)) {
    o.block = int32_t(bs);
    o.last_q = 20;
    o.keep_first_columns = 3;
    o.keep_last_diagonals = 2;
    o.skip_rows = 50;
    std::mt19937 rng(3);
    std::normal_distribution<float> normal(0.0f, 1.5f);
    for (auto* x : {&q, &k, &v})
      for (float& e : *x) e = normal(rng);
    for (int64_t t = 0; t < n; ++t) {
      for (int64_t j = 0; j <= t; ++j) p[size_t(t)].push_back(score(t, j));
      const double m = *std::max_element(p[size_t(t)].begin(), p[size_t(t)].end());
      double sum = 0;
      for (double& x : p[size_t(t)]) sum += (x = std::exp(x - m));
      for (double& x : p[size_t(t)]) x /= sum;
    }
    for (int64_t t = n - o.last_q; t < n; ++t)
      for (int64_t j = 0; j <= t; ++j) {
        vertical[size_t(j)] += p[size_t(t)][size_t(j)];
        slash[size_t(t - j)] += p[size_t(t)][size_t(j)];
      }
    for (int64_t j = 0; j < o.keep_first_columns; ++j) vertical[size_t(j)] = 1e9;
    for (int64_t d = 0; d < o.keep_last_diagonals; ++d) slash[size_t(d)] = 1e9;
  }

  const float* qh() const { return q.data() + hd; }
  const float* kh() const { return k.data() + hd; }
  const float* vh() const { return v.data() + hd; }
  double score(int64_t t, int64_t j) const {
    double d = 0;
    for (int64_t i = 0; i < hd; ++i) d += double(qh()[t * stride + i]) * kh()[j * stride + i];
    return d / std::sqrt(double(hd));
  }

  // kept[j], j <= t: whether `cand` computes key j in row t.
  std::vector<char> kept(const mi::Candidate& cand, int64_t t) const {
    const int64_t q0 = t / bs * bs, q1 = q0 + bs;
    std::set<int64_t> cols, diags, blocks;
    if (cand.type == mi::HeadType::VerticalSlash) cols = best_of(vertical, cand.a), diags = best_of(slash, cand.b);
    if (cand.type == mi::HeadType::BlockSparse) {
      std::vector<double> s;
      for (int64_t kb = 0; kb <= t / bs; ++kb) {
        double d = 0;
        for (int64_t i = 0; i < hd; ++i) {
          double mq = 0, mk = 0;
          for (int64_t r = q0; r < std::min(q1, n); ++r) mq += qh()[r * stride + i] / double(std::min(q1, n) - q0);
          for (int64_t r = kb * bs; r < std::min(kb * bs + bs, n); ++r)
            mk += kh()[r * stride + i] / double(std::min(kb * bs + bs, n) - kb * bs);
          d += mq * mk;
        }
        s.push_back(d);
      }
      blocks = best_of(s, cand.a);
    }
    std::vector<char> in(size_t(t + 1), 0);
    for (int64_t j = 0; j <= t; ++j) {
      if (cand.type == mi::HeadType::StreamLlm) in[size_t(j)] = j < cand.a || j >= q0 - cand.b;
      if (cand.type == mi::HeadType::BlockSparse) in[size_t(j)] = blocks.count(j / bs) > 0;
      if (cand.type == mi::HeadType::VerticalSlash) {
        in[size_t(j)] = cols.count(j) > 0;
        for (int64_t d : diags) in[size_t(j)] = in[size_t(j)] || (j >= q0 - d && j < q1 - d);
      }
    }
    return in;
  }

  // Row t's attention output over the keys `in` marks: the softmax of their
  // scores alone (zeros when none is kept).
  std::vector<double> output(int64_t t, const std::vector<char>& in) const {
    double m = -std::numeric_limits<double>::infinity();
    for (int64_t j = 0; j <= t; ++j)
      if (in[size_t(j)]) m = std::max(m, score(t, j));
    std::vector<double> out(size_t(hd), 0.0);
    double sum = 0;
    for (int64_t j = 0; j <= t; ++j) {
      if (!in[size_t(j)]) continue;
      const double w = std::exp(score(t, j) - m);
      sum += w;
      for (int64_t i = 0; i < hd; ++i) out[size_t(i)] += w * vh()[j * stride + i];
    }
    for (double& x : out) x = sum > 0 ? x / sum : 0.0;
    return out;
  }
};

const std::vector<mi::Candidate> kSomeCandidates = {
    {mi::HeadType::StreamLlm, 5, 20},     {mi::HeadType::VerticalSlash, 4, 6}, {mi::HeadType::VerticalSlash, 12, 3},
    {mi::HeadType::BlockSparse, 3, 0},    {mi::HeadType::StreamLlm, 40, 8}};

// Recall by the definition of each kind, in double, for random queries and keys.
TEST(MInferenceSearch, RecallOfEachCandidateMatchesTheDefinition) {
  const DefinedHead head;
  const int64_t n = head.n;
  const auto got = mi::candidate_recall(head.qh(), head.stride, head.kh(), head.stride, n, head.hd, kSomeCandidates,
                                        head.o);
  for (size_t c = 0; c < kSomeCandidates.size(); ++c) {
    double total = 0;
    for (int64_t t = head.o.skip_rows; t < n; ++t) {
      const auto in = head.kept(kSomeCandidates[c], t);
      for (int64_t j = 0; j <= t; ++j)
        if (in[size_t(j)]) total += head.p[size_t(t)][size_t(j)];
    }
    EXPECT_NEAR(got[c], total / double(n - head.o.skip_rows), 1e-4) << "candidate " << c;
    EXPECT_GT(got[c], 0.0);
    EXPECT_LT(got[c], 1.0);
  }
}

// The output search against each candidate's restricted softmax computed
// directly, in double, on every row_stride-th row from skip_rows.
TEST(MInferenceSearch, OutputDeviationCountsMatchTheRestrictedSoftmax) {
  DefinedHead head;
  head.o.row_stride = 7;
  const int64_t n = head.n, hd = head.hd;
  for (const double threshold : {5e-3, 0.2}) {
    SCOPED_TRACE(threshold);
    head.o.threshold = threshold;
    const auto got = mi::candidate_output_deviation(head.qh(), head.stride, head.kh(), head.stride, head.vh(),
                                                    head.stride, n, hd, kSomeCandidates, head.o);
    ASSERT_EQ(got.size(), kSomeCandidates.size());
    const int64_t rows = (n - head.o.skip_rows + 6) / 7;  // 50, 57, ..., 197
    int64_t partial = 0;  // candidates with some but not all elements deviating
    for (size_t c = 0; c < kSomeCandidates.size(); ++c) {
      // Elements closer to the threshold than rounding may land either side.
      int64_t surely = 0, maybe = 0;
      for (int64_t t = head.o.skip_rows; t < n; t += 7) {
        const auto sparse = head.output(t, head.kept(kSomeCandidates[c], t));
        const auto dense = head.output(t, std::vector<char>(size_t(t + 1), 1));
        for (int64_t i = 0; i < hd; ++i) {
          const double off = std::abs(sparse[size_t(i)] - dense[size_t(i)]);
          surely += off > threshold + 1e-9;
          maybe += off > threshold - 1e-9;
        }
      }
      EXPECT_EQ(got[c].elements, rows * hd) << "candidate " << c;
      EXPECT_GE(got[c].deviating, surely) << "candidate " << c;
      EXPECT_LE(got[c].deviating, maybe) << "candidate " << c;
      EXPECT_DOUBLE_EQ(got[c].share(), double(got[c].deviating) / double(rows * hd));
      partial += got[c].deviating > 0 && got[c].deviating < rows * hd;
    }
    EXPECT_GT(partial, 0);  // the counts tell the candidates apart
  }
}

TEST(MInferenceSearch, ACandidateKeepingEveryKeyDeviatesNowhere) {
  const DefinedHead head;
  const int64_t n = head.n, blocks = (n + head.bs - 1) / head.bs;
  const std::vector<mi::Candidate> everything = {{mi::HeadType::StreamLlm, n, 0},
                                                 {mi::HeadType::StreamLlm, 0, n},
                                                 {mi::HeadType::VerticalSlash, n, 0},
                                                 {mi::HeadType::VerticalSlash, 0, n},
                                                 {mi::HeadType::BlockSparse, blocks, 0},
                                                 {mi::HeadType::StreamLlm, 5, 20}};  // the control: sparse
  const auto got = mi::candidate_output_deviation(head.qh(), head.stride, head.kh(), head.stride, head.vh(),
                                                  head.stride, n, head.hd, everything, head.o);
  for (size_t c = 0; c + 1 < everything.size(); ++c) {
    EXPECT_EQ(got[c].deviating, 0) << "candidate " << c;
    EXPECT_EQ(got[c].elements, (n - head.o.skip_rows) * head.hd) << "candidate " << c;
  }
  EXPECT_GT(got.back().deviating, 0);
  const auto recall = mi::candidate_recall(head.qh(), head.stride, head.kh(), head.stride, n, head.hd, everything,
                                           head.o);
  for (size_t c = 0; c + 1 < everything.size(); ++c) EXPECT_NEAR(recall[c], 1.0, 1e-12) << "candidate " << c;
}

TEST(MInferenceSearch, CandidatesAreScoredWithTheCountsTheRunGivesThem) {
  // 4,096 tokens against a 131,072-token reference: scaled by 1/32, then the
  // run's floors (30 verticals, 50 slashes); stream_llm and block_sparse as scaled.
  const auto run = mi::run_candidates(4096.0 / 131072.0, 4096, 64);
  const auto scaled = mi::reference_candidates(4096.0 / 131072.0, 4096, 64);
  ASSERT_EQ(run.size(), scaled.size());
  const std::vector<std::pair<int64_t, int64_t>> counts = {{30, 50}, {30, 50}, {30, 50}, {110, 50}};
  for (size_t c = 1; c <= 4; ++c) {
    EXPECT_LT(scaled[c].b, 50) << "candidate " << c;
    EXPECT_EQ(std::pair(run[c].a, run[c].b), counts[c - 1]) << "candidate " << c;
  }
  EXPECT_EQ(run[0].a, scaled[0].a);
  EXPECT_EQ(run[0].b, scaled[0].b);
  EXPECT_EQ(run[5].a, scaled[5].a);
  // What the plugin runs with, for a file entry at this context, is the same.
  EXPECT_EQ(mi::vertical_slash_run_counts(scaled[1].a, scaled[1].b, 4096), (std::pair<int64_t, int64_t>(30, 50)));
  // Never more than the prompt.
  const auto tiny = mi::run_candidates(1.0, 40, 64);
  EXPECT_EQ(tiny[1].a, 30);
  EXPECT_EQ(tiny[1].b, 40);
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

// The queries, keys and values of one dense forward, per layer.
struct QkvTaps final : public ForwardObserver {
  uint32_t taps() const override { return kTapQueries | kTapKeys | kTapValues; }
  void on_layer(const CalibrationTaps& t) override {
    q.emplace_back(t.queries.begin(), t.queries.end());
    k.emplace_back(t.keys.begin(), t.keys.end());
    v.emplace_back(t.values.begin(), t.values.end());
  }
  std::vector<std::vector<float>> q, k, v;
};

// The output search as the host runs it, beside the recall search in the same
// artifact root: its own folder (the mode is part of the cache key), the
// values tapped, each head's entry the candidate with the fewest deviating
// output elements of the head's own queries and its kv head's keys and values
// (GQA), scored 1 - their share; then the method runs on it.
TEST(MInferenceSearch, TheOutputSearchRunsEndToEndApartFromTheRecallSearch) {
  auto engine = Engine::create(model(), EngineOptions{4, 0, 0});
  ASSERT_TRUE(engine.ok());
  const PluginEntry* entry = test::plugin_registry().find("minference");
  ASSERT_NE(entry, nullptr);
  const auto root = test::temp_path("minference-search");
  const int64_t tokens = 256, block = 16, context = 2048, skip = 64, stride = 15;
  auto prepare = [&](const std::string& mode) {
    ParamValues p;  // every parameter, as the config parser hands them
    for (const ParamSpec& spec : entry->params) p.set(spec.name, spec.default_value);
    p.set("search", mode);
    p.set("search_tokens", tokens);
    p.set("search_skip_rows", skip);
    p.set("search_row_stride", stride);
    p.set("kernel_block", block);
    p.set("reference_context", context);
    auto handle = test::plugin_registry().create("minference", p);
    EXPECT_TRUE(handle.ok()) << (handle.ok() ? "" : handle.message());
    auto prepared = prepare_method(*handle->get(), *entry, p, **engine, root);
    EXPECT_TRUE(prepared.ok()) << (prepared.ok() ? "" : prepared.message());
    return std::pair{std::move(*handle), prepared.ok() ? *prepared : PreparedMethod{}};
  };
  const PreparedMethod recalled = prepare("recall").second;
  auto [method, searched] = prepare("output");
  ASSERT_NE(method.get(), nullptr);
  EXPECT_TRUE(searched.calibrated);
  EXPECT_NE(searched.artifact_dir, recalled.artifact_dir);
  EXPECT_NE(searched.request.taps & kTapValues, 0u);
  EXPECT_EQ(recalled.request.taps & kTapValues, 0u);
  auto file = mi::read_pattern_file((searched.artifact_dir / "patterns.json").string(), 2, 4);
  ASSERT_TRUE(file.ok()) << file.message();

  // The same search on the calibration prompt's taps.
  auto prompt = corpus_windows((*engine)->model().tokenizer(), "kv_retrieval", 1, tokens, 0);
  ASSERT_TRUE(prompt.ok()) << prompt.message();
  QkvTaps taps;
  auto seq = (*engine)->new_sequence();
  ASSERT_TRUE((*engine)->forward(*seq, (*prompt)[0], tokens, [](int64_t, std::span<const float>) {}, &taps).ok());
  const ModelShape shape = (*engine)->shape();
  const int64_t hd = shape.head_dim, qd = shape.n_heads * hd, kd = shape.n_kv_heads * hd;
  ASSERT_EQ(taps.v.size(), size_t(shape.n_layers));
  const auto candidates = mi::run_candidates(double(tokens) / double(context), tokens, int32_t(block));
  auto written = mi::reference_candidates(1.0, tokens, int32_t(block));
  written.back() = {mi::HeadType::BlockSparse, 8, 1};
  mi::SearchOptions o;
  o.block = int32_t(block);
  o.skip_rows = skip;
  o.row_stride = stride;
  for (int32_t l = 0; l < shape.n_layers; ++l)
    for (int32_t h = 0; h < shape.n_heads; ++h) {
      SCOPED_TRACE("layer " + std::to_string(l) + " head " + std::to_string(h));
      const int32_t g = h / shape.group_size();
      const auto d = mi::candidate_output_deviation(taps.q[size_t(l)].data() + h * hd, qd, taps.k[size_t(l)].data() + g * hd,
                                                    kd, taps.v[size_t(l)].data() + g * hd, kd, tokens, hd, candidates, o);
      size_t best = 0;
      for (size_t c = 1; c < d.size(); ++c)
        if (d[c].deviating < d[best].deviating) best = c;
      const mi::HeadPattern& got = file->layers[size_t(l)][size_t(h)];
      EXPECT_EQ(got.type, written[best].type);
      EXPECT_EQ(got.a, written[best].a);
      EXPECT_EQ(got.b, written[best].b);
      EXPECT_NEAR(got.score, 1.0 - d[best].share(), 1e-12);
      EXPECT_EQ(d[best].elements, 13 * hd);  // rows 64, 79, ..., 244
    }

  ASSERT_TRUE((*engine)->set_method(method.get(), entry->hooks, nullptr, "minference").ok());
  (*engine)->reset_counters();
  test::run_trace(**engine, method.get(), test::random_tokens(model()->config().n_vocab, 300, 5), 0);
  EXPECT_EQ((*engine)->counters().sparse_prefill_heads, 2 * 4);
  const auto counters = method->counters();
  EXPECT_EQ(counters.at("heads_vertical_and_slash") + counters.at("heads_stream_llm") + counters.at("heads_block_sparse"),
            2 * 4);
}

TEST(MInference, BatchInvariance) {
  for (const char* pattern : {"vertical_and_slash", "stream_llm", "block_sparse"})
    EXPECT_BATCH_INVARIANT(model(), "minference",
                           test::params({{"default_pattern", std::string(pattern)}, {"search", std::string("off")},
                                         {"vertical", int64_t{8}}, {"slash", int64_t{8}}, {"n_init", int64_t{4}},
                                         {"n_local", int64_t{8}}, {"block_top_k", int64_t{1}},
                                         {"kernel_block", int64_t{8}}, {"last_q", int64_t{8}}}));
}

}  // namespace test_minference
}  // namespace inferlab
