// Calibration (kHookCalibrate): the taps a method receives are the dense
// forward's own intermediates; a calibration runs once per model, plugin
// version, parameters and request, and is found again; bad requests and
// failing methods give errors that name the plugin.
#include <gtest/gtest.h>

#include <fstream>
#include <stdexcept>

#include "experiment/calibration.h"
#include "plugin_test_support.h"

namespace inferlab {
namespace test_calibration {

std::filesystem::path write_corpus() {
  const auto path = test::temp_path("calibration-corpus.txt");
  std::ofstream out(path);
  for (int i = 0; i < 400; ++i) out << "Line " << i << " of a calibration corpus about rivers and stones.\n";
  return path;
}

std::unique_ptr<Engine> cpu_engine() {
  auto engine = Engine::create(test::gqa_test_model("calibration", 5), EngineOptions{4, 0, 0});
  EXPECT_TRUE(engine.ok());
  return engine.ok() ? std::move(*engine) : nullptr;
}

// Keeps a copy of every tap, and the embedding table once loaded.
class Recorder final : public Method {
 public:
  Recorder(CalibrationRequest request, bool fail = false) : request_(std::move(request)), fail_(fail) {}
  CalibrationRequest calibration(const ModelShape&) override { return request_; }
  void on_calibration(const CalibrationTaps& t) override {
    if (fail_) throw std::runtime_error("recorder failed on purpose");
    Record r;
    r.sample = t.sample, r.layer = t.layer, r.n_tokens = t.n_tokens;
    r.tokens.assign(t.tokens.begin(), t.tokens.end());
    for (auto [to, from] : {std::pair{&r.hidden_in, t.hidden_in}, {&r.queries, t.queries}, {&r.keys, t.keys},
                            {&r.values, t.values}, {&r.attention_out, t.attention_out},
                            {&r.ffn_activation, t.ffn_activation}, {&r.logits, t.logits}})
      to->assign(from.begin(), from.end());
    records.push_back(std::move(r));
  }
  Status finish_calibration(const std::string& dir) override {
    std::ofstream(std::filesystem::path(dir) / "recorded.txt") << records.size() << "\n";
    return ok_status();
  }
  Status on_load(const LoadContext& ctx) override {
    const auto e = ctx.weights->tensor("token_embd", -1);
    embedding.assign(e.begin(), e.end());
    loaded_from = ctx.artifact_dir;
    return ok_status();
  }

  struct Record {
    int32_t sample, layer, n_tokens;
    std::vector<int32_t> tokens;
    std::vector<float> hidden_in, queries, keys, values, attention_out, ffn_activation, logits;
  };
  std::vector<Record> records;
  std::vector<float> embedding;
  std::string loaded_from;

 private:
  CalibrationRequest request_;
  bool fail_;
};

PluginEntry recorder_entry() {
  return PluginEntry{"recorder", "1.0.0", "records taps", kHookLoad | kHookCalibrate, {}, ""};
}

TEST(Calibration, TapsAreTheDenseForwardsOwnIntermediates) {
  auto engine = cpu_engine();
  ASSERT_NE(engine, nullptr);
  const auto corpus = write_corpus();
  const uint32_t all =
      kTapHiddenIn | kTapQueries | kTapKeys | kTapValues | kTapAttentionOut | kTapFfnActivation | kTapLogits;
  Recorder method(CalibrationRequest{corpus.string(), 2, 12, all});
  const auto root = test::temp_path("calibration-taps");
  auto prepared = prepare_method(method, recorder_entry(), {}, *engine, root);
  ASSERT_TRUE(prepared.ok()) << prepared.message();
  EXPECT_TRUE(prepared->calibrated);
  EXPECT_EQ(prepared->artifact_dir.string(), method.loaded_from);
  EXPECT_TRUE(std::filesystem::exists(prepared->artifact_dir / "recorded.txt"));
  EXPECT_TRUE(std::filesystem::exists(prepared->artifact_dir / "calibration.json"));

  const ModelConfig& c = engine->config();
  // Per sample: each layer in order, then the logits (layer -1).
  ASSERT_EQ(method.records.size(), size_t(2 * (c.n_layers + 1)));
  for (size_t i = 0; i < method.records.size(); ++i) {
    const auto& r = method.records[i];
    const int32_t layer = int32_t(i % size_t(c.n_layers + 1));
    EXPECT_EQ(r.sample, int32_t(i / size_t(c.n_layers + 1)));
    EXPECT_EQ(r.layer, layer == c.n_layers ? -1 : layer);
    ASSERT_EQ(r.n_tokens, 12);
    ASSERT_EQ(r.tokens.size(), 12u);
    const size_t n = 12;
    if (r.layer < 0) {
      EXPECT_EQ(r.logits.size(), n * size_t(c.n_vocab));
      EXPECT_TRUE(r.hidden_in.empty());
      continue;
    }
    EXPECT_EQ(r.hidden_in.size(), n * size_t(c.n_embd));
    EXPECT_EQ(r.queries.size(), n * size_t(c.q_dim()));
    EXPECT_EQ(r.keys.size(), n * size_t(c.kv_dim()));
    EXPECT_EQ(r.values.size(), n * size_t(c.kv_dim()));
    EXPECT_EQ(r.attention_out.size(), n * size_t(c.q_dim()));
    EXPECT_EQ(r.ffn_activation.size(), n * size_t(c.n_ff));
    EXPECT_TRUE(r.logits.empty());
  }
  // Layer 0's input is the embedding of the sample's tokens, row for row.
  for (int32_t s = 0; s < 2; ++s) {
    const auto& r = method.records[size_t(s * (c.n_layers + 1))];
    for (size_t t = 0; t < r.tokens.size(); ++t)
      for (int64_t d = 0; d < c.n_embd; ++d)
        ASSERT_EQ(r.hidden_in[t * size_t(c.n_embd) + size_t(d)],
                  method.embedding[size_t(r.tokens[t]) * size_t(c.n_embd) + size_t(d)])
            << "sample " << s << " token " << t;
  }
  // The logits are those of a dense forward of the same tokens; the samples differ.
  for (int32_t s = 0; s < 2; ++s) {
    const auto& r = method.records[size_t(s * (c.n_layers + 1) + c.n_layers)];
    std::vector<float> dense;
    auto seq = engine->new_sequence();
    ASSERT_TRUE(engine->forward(*seq, r.tokens, 0, [&](int64_t, std::span<const float> row) {
      dense.insert(dense.end(), row.begin(), row.end());
    }).ok());
    EXPECT_EQ(dense, r.logits) << "sample " << s;
  }
  EXPECT_NE(method.records[0].tokens, method.records[size_t(c.n_layers + 1)].tokens);
  // Only what was asked for comes: a request for the input alone gets no other tap.
  Recorder hidden_only(CalibrationRequest{corpus.string(), 1, 8, kTapHiddenIn});
  ASSERT_TRUE(prepare_method(hidden_only, recorder_entry(), {}, *engine, root).ok());
  ASSERT_EQ(hidden_only.records.size(), size_t(c.n_layers));
  for (const auto& r : hidden_only.records) {
    EXPECT_EQ(r.hidden_in.size(), 8u * size_t(c.n_embd));
    EXPECT_TRUE(r.queries.empty() && r.keys.empty() && r.values.empty() && r.attention_out.empty() &&
                r.ffn_activation.empty());
  }
}

// The keys and values taps are the rows the forward stores: each equals what a
// dense forward of the same tokens leaves in the cache (keys rotated, values not).
TEST(Calibration, KeysAndValuesTapsAreTheRowsTheCacheStores) {
  auto engine = cpu_engine();
  ASSERT_NE(engine, nullptr);
  Recorder method(CalibrationRequest{write_corpus().string(), 1, 12, kTapKeys | kTapValues});
  ASSERT_TRUE(prepare_method(method, recorder_entry(), {}, *engine, test::temp_path("calibration-values")).ok());
  const ModelConfig& c = engine->config();
  ASSERT_EQ(method.records.size(), size_t(c.n_layers));
  auto seq = engine->new_sequence();
  ASSERT_TRUE(engine->forward(*seq, method.records[0].tokens, 12, [](int64_t, std::span<const float>) {}).ok());
  const size_t kv = size_t(c.kv_dim()), hd = size_t(c.head_dim);
  for (const auto& r : method.records) {
    ASSERT_EQ(r.values.size(), 12 * kv);
    ASSERT_EQ(r.keys.size(), 12 * kv);
    EXPECT_TRUE(r.queries.empty());
    EXPECT_NE(r.values, r.keys);
    for (int32_t g = 0; g < c.n_kv_heads; ++g)
      for (int32_t t = 0; t < 12; ++t)
        for (size_t d = 0; d < hd; ++d) {
          ASSERT_EQ(r.values[size_t(t) * kv + size_t(g) * hd + d], seq->v_row(r.layer, g, t)[d])
              << "layer " << r.layer << " kv head " << g << " token " << t;
          ASSERT_EQ(r.keys[size_t(t) * kv + size_t(g) * hd + d], seq->k_row(r.layer, g, t)[d])
              << "layer " << r.layer << " kv head " << g << " token " << t;
        }
  }
}

TEST(Calibration, RunsOncePerParametersAndIsFoundAgain) {
  auto engine = cpu_engine();
  ASSERT_NE(engine, nullptr);
  const PluginEntry* entry = test::plugin_registry().find("probe");
  ASSERT_NE(entry, nullptr);
  EXPECT_NE(entry->hooks & kHookCalibrate, 0u);
  const auto corpus = write_corpus().string();
  const auto root = test::temp_path("calibration-cache");
  auto prepare = [&](int64_t tokens, int64_t stride) {
    ParamValues p;  // every parameter, as the config parser hands them
    for (const ParamSpec& spec : entry->params) p.set(spec.name, spec.default_value);
    p.set("calibrate_samples", int64_t(3));
    p.set("calibrate_tokens", tokens);
    p.set("calibrate_corpus", corpus);
    p.set("neuron_stride", stride);
    auto handle = test::plugin_registry().create("probe", p);
    EXPECT_TRUE(handle.ok());
    auto prepared = prepare_method(*handle->get(), *entry, p, *engine, root);
    EXPECT_TRUE(prepared.ok()) << (prepared.ok() ? "" : prepared.message());
    return std::pair{prepared.ok() ? *prepared : PreparedMethod{}, handle->get()->counters()};
  };
  const int32_t layers = engine->config().n_layers;
  auto [first, c1] = prepare(16, 1);
  EXPECT_TRUE(first.calibrated);
  EXPECT_FALSE(first.reused);
  EXPECT_EQ(c1["calibration_layers"], 3.0 * layers);
  EXPECT_EQ(c1["calibration_logits"], 3.0);
  EXPECT_EQ(c1["calibration_finished"], 1.0);
  EXPECT_EQ(c1.count("tap_size_wrong"), 0u);
  EXPECT_EQ(c1["calibration_read_samples"], 3.0);
  EXPECT_NE(c1["calibration_read_hidden_sum"], 0.0);
  EXPECT_EQ(engine->counters().forward_calls, 3);

  // Same model, version, parameters: found, nothing runs, the method reads the same artifact.
  auto [again, c2] = prepare(16, 1);
  EXPECT_FALSE(again.calibrated);
  EXPECT_TRUE(again.reused);
  EXPECT_EQ(again.artifact_dir, first.artifact_dir);
  EXPECT_EQ(c2.count("calibration_layers"), 0u);
  EXPECT_EQ(c2["calibration_read_hidden_sum"], c1["calibration_read_hidden_sum"]);
  EXPECT_EQ(engine->counters().forward_calls, 3);

  // Any parameter changes the folder, even one calibration does not read.
  auto [other, c3] = prepare(20, 1);
  EXPECT_TRUE(other.calibrated);
  EXPECT_NE(other.artifact_dir, first.artifact_dir);
  auto [strided, c4] = prepare(16, 2);
  EXPECT_TRUE(strided.calibrated);
  EXPECT_NE(strided.artifact_dir, first.artifact_dir);

  // A folder without its marker is an unfinished calibration: done again.
  std::filesystem::remove(first.artifact_dir / "calibration.json");
  auto [redone, c5] = prepare(16, 1);
  EXPECT_TRUE(redone.calibrated);
  EXPECT_EQ(redone.artifact_dir, first.artifact_dir);
  EXPECT_EQ(c5["calibration_read_hidden_sum"], c1["calibration_read_hidden_sum"]);
}

TEST(Calibration, BadRequestsAndFailingMethodsNameThePlugin) {
  auto engine = cpu_engine();
  ASSERT_NE(engine, nullptr);
  const auto root = test::temp_path("calibration-errors");
  Recorder missing(CalibrationRequest{"/nonexistent/calibration.txt", 2, 8, kTapHiddenIn});
  auto r = prepare_method(missing, recorder_entry(), {}, *engine, root);
  ASSERT_FALSE(r.ok());
  EXPECT_NE(r.message().find("plugin recorder"), std::string::npos) << r.message();
  EXPECT_NE(r.message().find("/nonexistent/calibration.txt"), std::string::npos) << r.message();

  const auto corpus = write_corpus().string();
  Recorder negative(CalibrationRequest{corpus, -1, 8, kTapHiddenIn});
  r = prepare_method(negative, recorder_entry(), {}, *engine, root);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.message(), "plugin recorder: calibration asks for -1 samples of 8 tokens");

  Recorder too_long(CalibrationRequest{corpus, 1, engine->config().context_length + 1, kTapHiddenIn});
  r = prepare_method(too_long, recorder_entry(), {}, *engine, root);
  ASSERT_FALSE(r.ok());
  EXPECT_NE(r.message().find("plugin recorder: calibration:"), std::string::npos) << r.message();

  Recorder failing(CalibrationRequest{corpus, 1, 8, kTapHiddenIn}, true);
  r = prepare_method(failing, recorder_entry(), {}, *engine, root);
  ASSERT_FALSE(r.ok());
  EXPECT_NE(r.message().find("recorder failed on purpose"), std::string::npos) << r.message();
  EXPECT_TRUE(failing.loaded_from.empty()) << "a failed calibration must not load the method";
}

}  // namespace test_calibration
}  // namespace inferlab
