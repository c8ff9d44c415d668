// The figures' data (results/figures.h) and the HTML report (results/html_report.h):
// which runs make a line and along which parameter, the report's intervals as
// error bars, dense as the reference, bars for methods without a numeric axis,
// figures across context lengths; the page carries the text report's tables.
#include <gtest/gtest.h>

#include <nlohmann/json.hpp>

#include <algorithm>
#include <string>
#include <vector>

#include "results/database.h"
#include "results/figures.h"
#include "results/html_report.h"
#include "results/report.h"
#include "test_support.h"

namespace inferlab {
namespace test_figures {

using json = nlohmann::json;

struct RunSpec {
  std::string label, plugin, task;
  json params = json::object();  // the method's
  std::vector<MetricValue> metrics;
  json task_params = json::object();
  std::vector<SampleRow> samples = {};
};

RunRecord record(const RunSpec& s, int n) {
  RunRecord r;
  r.hash = "h" + std::to_string(n);
  r.experiment = "sweep";
  r.label = s.label;
  r.plugin = s.plugin;
  r.task = s.task;
  r.baseline = s.plugin == "dense";
  r.status = RunStatus::Finished;
  r.backend = "cpu";
  r.model = "tiny";
  r.config_json = json{{"params", s.params}, {"task", {{"type", s.task}, {"params", s.task_params}}}}.dump();
  r.metrics = s.metrics;
  r.samples = s.samples;
  return r;
}

ReportData load(const std::string& name, const std::vector<RunSpec>& runs) {
  auto db = ResultsDb::open(test::temp_path(name + ".db"));
  EXPECT_TRUE(db.ok()) << (db.ok() ? "" : db.message());
  if (!db) std::abort();
  for (size_t i = 0; i < runs.size(); ++i) EXPECT_TRUE(db->record_run(record(runs[i], int(i))).ok());
  auto data = load_report(*db, "");
  EXPECT_TRUE(data.ok()) << (data.ok() ? "" : data.message());
  if (!data) std::abort();
  return std::move(data).value();
}

const json* figure(const json& spec, const std::string& id) {
  for (const json& f : spec["figures"])
    if (f["id"] == id) return &f;
  return nullptr;
}

std::vector<std::string> ids(const json& spec) {
  std::vector<std::string> out;
  for (const json& f : spec["figures"]) out.push_back(f["id"]);
  return out;
}

std::vector<std::string> series_names(const json& f) {
  std::vector<std::string> out;
  for (const json& s : f["series"]) out.push_back(s["name"]);
  return out;
}

std::vector<double> xs(const json& series) {
  std::vector<double> out;
  for (const json& p : series["points"]) out.push_back(p["x"]);
  return out;
}

// Passkey-like samples: `solved` of `n` right.
std::vector<SampleRow> outcomes(int solved, int n) {
  std::vector<SampleRow> out;
  for (int i = 0; i < n; ++i) out.push_back(SampleRow{i, 100, "1", "", i < solved, 0.1, "{}"});
  return out;
}

constexpr double kMiB = 1024.0 * 1024.0;

// A KV sweep: a grid axis as text ("0.5", as configs record floats), budgets
// written as separate methods (h2o-64, h2o-128), a categorical axis, and a
// method with two axes where one varies with the other.
std::vector<RunSpec> kv_sweep() {
  const auto m = [](double acc, double keys, double tok_s, double kv_mib) {
    return std::vector<MetricValue>{{"accuracy", acc, ""},
                                    {"keys_read_per_step", keys, ""},
                                    {"decode_tokens_per_s", tok_s, ""},
                                    {"prefill_tokens_per_s", 500, ""},
                                    {"kv_bytes_peak", kv_mib * kMiB, ""}};
  };
  return {
      {"dense", "dense", "passkey", {}, m(0.9, 512, 100, 8), {}, outcomes(9, 10)},
      {"quest token_budget=64", "quest", "passkey", {{"token_budget", 64}, {"page_size", 16}}, m(0.5, 64, 150, 8), {},
       outcomes(5, 10)},
      {"quest token_budget=128", "quest", "passkey", {{"token_budget", 128}, {"page_size", 16}}, m(0.7, 128, 140, 8),
       {}, outcomes(7, 10)},
      {"h2o-64", "h2o", "passkey", {{"heavy", 32}, {"recent", 32}}, m(0.4, 64, 130, 1), {}, outcomes(4, 10)},
      {"h2o-128", "h2o", "passkey", {{"heavy", 64}, {"recent", 64}}, m(0.6, 128, 120, 2), {}, outcomes(6, 10)},
      {"stream positions=cache", "streamingllm", "passkey", {{"window", 60}, {"positions", "cache"}},
       m(0.3, 64, 160, 1), {}, outcomes(3, 10)},
      {"stream positions=original", "streamingllm", "passkey", {{"window", 60}, {"positions", "original"}},
       m(0.2, 64, 160, 1), {}, outcomes(2, 10)},
  };
}

TEST(Figures, OneLinePerMethodAlongItsGridParameterWithTheReportsIntervals) {
  const ReportData data = load("figures-kv", kv_sweep());
  const json spec = figure_specs(data);
  EXPECT_EQ(spec["experiment"], "sweep");
  const json* quest = figure(spec, "passkey-accuracy-vs-token-budget");
  ASSERT_NE(quest, nullptr) << spec.dump(1);
  EXPECT_EQ(series_names(*quest), std::vector<std::string>{"quest"});
  EXPECT_EQ(xs((*quest)["series"][0]), (std::vector<double>{64, 128}));
  // Accuracy in percent, its error bar the report's Wilson interval.
  const json& p = (*quest)["series"][0]["points"][0];
  EXPECT_DOUBLE_EQ(p["y"].get<double>(), 50.0);
  const auto wilson = accuracy_interval(*data.groups[0].runs[1]);
  ASSERT_TRUE(wilson.has_value());
  EXPECT_DOUBLE_EQ(p["lo"].get<double>(), 100 * wilson->lo);
  EXPECT_DOUBLE_EQ(p["hi"].get<double>(), 100 * wilson->hi);
  // Dense: the reference, with its interval.
  EXPECT_EQ((*quest)["reference"]["name"], "dense");
  EXPECT_DOUBLE_EQ((*quest)["reference"]["y"].get<double>(), 90.0);
  EXPECT_TRUE((*quest)["reference"].contains("lo"));
  EXPECT_EQ((*quest)["kind"], "line");
  EXPECT_EQ((*quest)["group"], 0);

  // h2o-64 and h2o-128 are one line along heavy; recent, which moves with it, is named.
  const json* h2o = figure(spec, "passkey-accuracy-vs-heavy");
  ASSERT_NE(h2o, nullptr) << json(ids(spec)).dump();
  EXPECT_EQ(series_names(*h2o), std::vector<std::string>{"h2o"});
  EXPECT_EQ(xs((*h2o)["series"][0]), (std::vector<double>{32, 64}));
  EXPECT_NE((*h2o)["notes"].dump().find("recent varies with heavy"), std::string::npos) << (*h2o)["notes"];

  // One axis for every KV method: the keys each read per step.
  const json* keys = figure(spec, "passkey-accuracy-vs-keys-read");
  ASSERT_NE(keys, nullptr);
  EXPECT_EQ(series_names(*keys),
            (std::vector<std::string>{"quest", "h2o", "stream positions=cache", "stream positions=original"}));
  EXPECT_EQ(xs((*keys)["series"][1]), (std::vector<double>{64, 128}));

  // Speedup (decode: the task decodes) against dense's 1, and memory where it differs.
  const json* speed = figure(spec, "passkey-decode-speedup-vs-token-budget");
  ASSERT_NE(speed, nullptr);
  EXPECT_DOUBLE_EQ((*speed)["series"][0]["points"][0]["y"].get<double>(), 1.5);
  EXPECT_DOUBLE_EQ((*speed)["reference"]["y"].get<double>(), 1.0);
  EXPECT_EQ(figure(spec, "passkey-prefill-speedup-vs-token-budget"), nullptr);
  EXPECT_EQ(figure(spec, "passkey-kv-memory-vs-token-budget"), nullptr);  // Quest keeps the whole cache
  EXPECT_NE(figure(spec, "passkey-kv-memory-vs-heavy"), nullptr);

  // A method without a numeric axis: bars, one per run.
  const json* bars = figure(spec, "passkey-accuracy-by-method");
  ASSERT_NE(bars, nullptr);
  EXPECT_EQ(bars->at("kind"), "bar");
  ASSERT_EQ((*bars)["bars"].size(), 2u);
  EXPECT_EQ((*bars)["bars"][0]["label"], "stream positions=cache");
  EXPECT_DOUBLE_EQ((*bars)["bars"][1]["y"].get<double>(), 20.0);

  // One color per name across figures; ids unique.
  EXPECT_EQ((*quest)["series"][0]["color"], (*keys)["series"][0]["color"]);
  auto all = ids(spec);
  std::sort(all.begin(), all.end());
  EXPECT_EQ(std::adjacent_find(all.begin(), all.end()), all.end());
}

TEST(Figures, ACategoricalAxisSplitsLinesAndPerplexityGetsALogAxisWhenWide) {
  const auto ppl = [](double v) { return std::vector<MetricValue>{{"perplexity", v, ""}}; };
  const auto windows = [](double base) {
    std::vector<SampleRow> out;
    for (int i = 0; i < 4; ++i)
      out.push_back(SampleRow{i, 64, "", "", std::nullopt, 0.1,
                              json{{"nll_mean", base + 0.1 * i}, {"nll_sum", (base + 0.1 * i) * 63}, {"scored", 63}}.dump()});
    return out;
  };
  const ReportData data =
      load("figures-modes",
           {{"dense", "dense", "perplexity", {}, ppl(8), {}, windows(2.0)},
            {"neurons mode=predictor neuron_keep=0.25", "dejavu", "perplexity",
             {{"mode", "predictor"}, {"neuron_keep", "0.25"}}, ppl(900), {}, windows(6.8)},
            {"neurons mode=predictor neuron_keep=0.5", "dejavu", "perplexity",
             {{"mode", "predictor"}, {"neuron_keep", "0.5"}}, ppl(46), {}, windows(3.8)},
            {"neurons mode=oracle neuron_keep=0.25", "dejavu", "perplexity",
             {{"mode", "oracle"}, {"neuron_keep", "0.25"}}, ppl(19.5), {}, windows(3.0)},
            {"neurons mode=oracle neuron_keep=0.5", "dejavu", "perplexity",
             {{"mode", "oracle"}, {"neuron_keep", "0.5"}}, ppl(9.5), {}, windows(2.2)}});
  const json spec = figure_specs(data);
  const json* f = figure(spec, "perplexity-perplexity-vs-neuron-keep");
  ASSERT_NE(f, nullptr) << json(ids(spec)).dump();
  EXPECT_EQ(series_names(*f), (std::vector<std::string>{"neurons mode=predictor", "neurons mode=oracle"}));
  EXPECT_TRUE((*f)["y_log"].get<bool>());
  // The bootstrap interval of the table.
  const auto ci = perplexity_interval(*data.groups[0].runs[1]);
  ASSERT_TRUE(ci.has_value());
  EXPECT_DOUBLE_EQ((*f)["series"][0]["points"][0]["lo"].get<double>(), ci->lo);
  EXPECT_NE((*f)["notes"].dump().find("bootstrap"), std::string::npos);
  // No decode: no decode speedup; no prefill rate recorded: no prefill speedup either.
  EXPECT_EQ(figure(spec, "perplexity-decode-speedup-vs-neuron-keep"), nullptr);
  EXPECT_EQ(figure(spec, "perplexity-prefill-speedup-vs-neuron-keep"), nullptr);
}

TEST(Figures, SectionsThatDifferInContextLengthGiveFiguresAcrossThem) {
  std::vector<RunSpec> runs;
  for (const int length : {2048, 4096}) {
    const json task = {{"prompt_tokens", json::array({length})}, {"samples", json::array({4})}};
    const double dense_prefill = 4000.0 / length;
    runs.push_back({"dense", "dense", "fidelity", {},
                    {{"fidelity_top1", 1, ""}, {"prefill_tokens_per_s", dense_prefill, ""}, {"decode_tokens_per_s", 50, ""}},
                    task});
    runs.push_back({"a-shape", "minference", "fidelity", {{"pattern", "a_shape"}},
                    {{"fidelity_top1", length == 2048 ? 0.9 : 0.8, ""},
                     {"prefill_tokens_per_s", dense_prefill * (length == 2048 ? 1.5 : 2.5), ""},
                     {"decode_tokens_per_s", 50, ""}},
                    task});
  }
  const ReportData data = load("figures-context", runs);
  ASSERT_EQ(data.groups.size(), 2u);
  const json spec = figure_specs(data);
  const json* f = figure(spec, "fidelity-prefill-speedup-vs-prompt-tokens");
  ASSERT_NE(f, nullptr) << json(ids(spec)).dump();
  EXPECT_EQ((*f)["group"], -1);
  EXPECT_EQ(series_names(*f), std::vector<std::string>{"a-shape"});
  EXPECT_EQ(xs((*f)["series"][0]), (std::vector<double>{2048, 4096}));
  EXPECT_DOUBLE_EQ((*f)["series"][0]["points"][1]["y"].get<double>(), 2.5);
  EXPECT_DOUBLE_EQ((*f)["reference"]["y"].get<double>(), 1.0);
  // Quality across lengths: dense is a line of its own (its own values move with the length).
  const json* q = figure(spec, "fidelity-top1-vs-prompt-tokens");
  ASSERT_NE(q, nullptr);
  EXPECT_EQ(series_names(*q), (std::vector<std::string>{"dense", "a-shape"}));
  // One setting per section: bars, not lines, within each.
  EXPECT_NE(figure(spec, "fidelity-prompt-tokens-2048-top1-by-method"), nullptr);
}

TEST(Figures, NothingToPlotWithOnlyDense) {
  const ReportData data = load("figures-dense", {{"dense", "dense", "perplexity", {}, {{"perplexity", 8, ""}}}});
  EXPECT_TRUE(figure_specs(data)["figures"].empty());
}

TEST(HtmlReport, TheTextReportsTablesEscapedWithEachSectionsFigures) {
  std::vector<RunSpec> runs = kv_sweep();
  runs[1].label = "quest <b>&\"budget\" token_budget=64";
  const ReportData data = load("figures-html", runs);
  const std::vector<ReportBlock> blocks = report_blocks(data);
  const std::string markdown = render_markdown(blocks);
  const std::vector<HtmlFigure> figures = {{0, "accuracy <vs> budget", "<svg xmlns=\"http://www.w3.org/2000/svg\"/>"},
                                           {-1, "across", "<svg xmlns=\"http://www.w3.org/2000/svg\"/>"}};
  const std::string html = render_html(data, blocks, figures, "a note & more");
  size_t tables = 0;
  for (const ReportBlock& b : blocks) tables += b.kind == ReportBlock::Kind::Table;
  size_t rules = 0;
  for (const auto& row : test::table_rows(markdown)) rules += !row.empty() && row[0].starts_with(":--");
  EXPECT_EQ(tables, rules);
  size_t html_tables = 0;
  for (size_t at = html.find("<table>"); at != std::string::npos; at = html.find("<table>", at + 1)) ++html_tables;
  EXPECT_EQ(html_tables, tables);
  EXPECT_NE(html.find("quest &lt;b&gt;&amp;&quot;budget&quot; token_budget=64"), std::string::npos);
  EXPECT_EQ(html.find("<b>&"), std::string::npos);
  EXPECT_NE(html.find("<p class=\"note\">a note &amp; more</p>"), std::string::npos);
  // Figures as data URIs: the section's after its table, the others after the sections.
  const size_t first_img = html.find("<img alt=\"accuracy &lt;vs&gt; budget\" src=\"data:image/svg+xml;base64,");
  ASSERT_NE(first_img, std::string::npos);
  EXPECT_LT(html.find("<table>"), first_img);
  EXPECT_LT(html.find("Across context lengths"), html.find("alt=\"across\""));
  // base64 of the SVG text.
  EXPECT_NE(html.find("PHN2ZyB4bWxucz0iaHR0cDovL3d3dy53My5vcmcvMjAwMC9zdmciLz4="), std::string::npos);
  EXPECT_EQ(html.find("<script"), std::string::npos);
  EXPECT_EQ(html.find("<link"), std::string::npos);
  EXPECT_EQ(html.rfind("</html>\n"), html.size() - 8);
}

}  // namespace test_figures
}  // namespace inferlab
