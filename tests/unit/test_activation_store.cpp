// Activation capture (CalibrationRequest::stored, `inferlab capture`): the
// store holds the dense forward's own intermediates, a capture resumes to the
// same bytes and a complete store runs nothing, corrupt files are refused by
// name, a stored calibration reads the store through the SDK reader and
// shares it, and the CLI writes one.
#include <gtest/gtest.h>
#include <sys/wait.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <iterator>

#include "datasets/tasks.h"
#include "experiment/activation_store.h"
#include "experiment/calibration.h"
#include "experiment/tracked_method.h"
#include "experiment/worker.h"
#include "inferlab/activations.h"
#include "plugins/method_context.h"
#include "test_support.h"

namespace inferlab {
namespace test_activation_store {

namespace fs = std::filesystem;

const uint32_t kAllStored = kStorableTaps;

fs::path write_corpus(int lines = 400) {
  const auto path = test::temp_path("activations-corpus.txt");
  std::ofstream out(path);
  for (int i = 0; i < lines; ++i) out << "Line " << i << " of a calibration corpus about rivers and stones.\n";
  return path;
}

std::unique_ptr<Engine> cpu_engine() {
  auto engine = Engine::create(test::gqa_test_model("activations", 5), EngineOptions{4, 0, 0});
  EXPECT_TRUE(engine.ok());
  return engine.ok() ? std::move(*engine) : nullptr;
}

std::string read_bytes(const fs::path& p) {
  std::ifstream in(p, std::ios::binary);
  return {std::istreambuf_iterator<char>(in), {}};
}

// Every tap of every layer of one forward call, by tap bit.
class Observer final : public ForwardObserver {
 public:
  uint32_t taps() const override { return kAllStored; }
  void on_layer(const CalibrationTaps& t) override {
    for (const uint32_t bit : tap_bits(kAllStored)) {
      std::span<const float> v = bit == kTapHiddenIn        ? t.hidden_in
                                 : bit == kTapQueries       ? t.queries
                                 : bit == kTapKeys          ? t.keys
                                 : bit == kTapAttentionOut  ? t.attention_out
                                 : bit == kTapFfnActivation ? t.ffn_activation
                                 : bit == kTapValues        ? t.values
                                 : bit == kTapAttentionIn   ? t.attention_in
                                 : bit == kTapFfnIn         ? t.ffn_in
                                 : bit == kTapHiddenOut     ? t.hidden_out
                                                            : t.ffn_gate;
      seen[{bit, t.layer}].assign(v.begin(), v.end());
    }
  }
  std::map<std::pair<uint32_t, int32_t>, std::vector<float>> seen;
};

// Row `r` of x (rows of `width`) rms-normed and scaled by `w`, in double.
std::vector<double> rmsnorm_row(const float* x, std::span<const float> w, int64_t width, double eps) {
  double ss = 0;
  for (int64_t i = 0; i < width; ++i) ss += double(x[i]) * double(x[i]);
  const double scale = 1.0 / std::sqrt(ss / double(width) + eps);
  std::vector<double> out(static_cast<size_t>(width));
  for (int64_t i = 0; i < width; ++i) out[size_t(i)] = double(x[i]) * scale * double(w[size_t(i)]);
  return out;
}
// x (in) times W^T, W (out, in) row-major, in double.
std::vector<double> matvec(std::span<const double> x, std::span<const float> w, int64_t out_dim) {
  const size_t in = x.size();
  std::vector<double> y(size_t(out_dim), 0.0);
  for (int64_t o = 0; o < out_dim; ++o)
    for (size_t i = 0; i < in; ++i) y[size_t(o)] += double(w[size_t(o) * in + i]) * x[i];
  return y;
}
// Max |got - want| over max |want|.
double rel_error(std::span<const float> got, const std::vector<double>& want) {
  double err = 0, scale = 1e-30;
  for (size_t i = 0; i < want.size(); ++i) {
    err = std::max(err, std::abs(double(got[i]) - want[i]));
    scale = std::max(scale, std::abs(want[i]));
  }
  return err / scale;
}

TEST(ActivationStore, StoredValuesAreTheForwardsOwnIntermediates) {
  auto engine = cpu_engine();
  ASSERT_NE(engine, nullptr);
  const auto corpus = write_corpus();
  CalibrationRequest request{corpus.string(), 2, 12, kAllStored | kTapLogits};
  request.stored = true;
  auto dir = capture_activations(*engine, request, test::temp_path("activations-values"));
  ASSERT_TRUE(dir.ok()) << dir.message();
  auto store = ActivationStore::open(*dir);
  ASSERT_TRUE(store.ok()) << store.message();
  const ModelConfig& c = engine->config();
  EXPECT_EQ(store->taps(), kAllStored) << "logits are not stored";
  EXPECT_EQ(store->n_layers(), c.n_layers);
  EXPECT_EQ(store->samples(), 2);
  EXPECT_EQ(store->tokens_per_sample(), 12);
  EXPECT_EQ(store->rows(), 24);
  EXPECT_EQ(store->width(kTapHiddenIn), c.n_embd);
  EXPECT_EQ(store->width(kTapAttentionIn), c.n_embd);
  EXPECT_EQ(store->width(kTapFfnIn), c.n_embd);
  EXPECT_EQ(store->width(kTapQueries), c.q_dim());
  EXPECT_EQ(store->width(kTapAttentionOut), c.q_dim());
  EXPECT_EQ(store->width(kTapKeys), c.kv_dim());
  EXPECT_EQ(store->width(kTapValues), c.kv_dim());
  EXPECT_EQ(store->width(kTapFfnGate), c.n_ff);
  EXPECT_EQ(store->width(kTapFfnActivation), c.n_ff);
  EXPECT_EQ(store->width(kTapLogits), 0);
  EXPECT_EQ(store->manifest().model_checksum, engine->model().checksum());
  EXPECT_EQ(store->manifest().arithmetic, "cpu-f32");
  // The rows' tokens are the calibration windows (the same windows as on_calibration's).
  auto windows = corpus_windows(engine->model().tokenizer(), corpus.string(), 2, 12, 0);
  ASSERT_TRUE(windows.ok());
  std::vector<int32_t> tokens;
  ASSERT_TRUE(store->read_tokens(0, 24, tokens).ok());
  std::vector<int32_t> joined = (*windows)[0];
  joined.insert(joined.end(), (*windows)[1].begin(), (*windows)[1].end());
  EXPECT_EQ(tokens, joined);

  // Each tap of each layer is what an observer of a dense forward of the sample receives.
  std::vector<float> rows;
  for (int32_t s = 0; s < 2; ++s) {
    Observer observer;
    auto seq = engine->new_sequence();
    ASSERT_TRUE(engine->forward(*seq, (*windows)[size_t(s)], 12, [](int64_t, std::span<const float>) {}, &observer).ok());
    for (const uint32_t bit : tap_bits(kAllStored))
      for (int32_t l = 0; l < c.n_layers; ++l) {
        ASSERT_TRUE(store->read(bit, l, s * 12, 12, rows).ok());
        EXPECT_EQ(rows, (observer.seen[{bit, l}])) << tap_name(bit) << " layer " << l << " sample " << s;
        EXPECT_FALSE(rows.empty());
      }
  }

  // The new taps against the model's weights, by hand: attention_in = rmsnorm(hidden_in) * attn_norm,
  // ffn_in = rmsnorm(hidden_in + attention_out W_o^T) * ffn_norm, ffn_gate = ffn_in W_gate^T,
  // ffn_activation = silu(ffn_gate) * (ffn_in W_up^T).
  const ModelWeightView weights(engine->model());
  const int64_t d = c.n_embd, ff = c.n_ff, q = c.q_dim();
  std::vector<float> hidden, attn_in, attn_out, ffn_in, gate, act;
  for (int32_t l = 0; l < c.n_layers; ++l) {
    for (auto [bit, out] : {std::pair{kTapHiddenIn, &hidden}, {kTapAttentionIn, &attn_in},
                            {kTapAttentionOut, &attn_out}, {kTapFfnIn, &ffn_in}, {kTapFfnGate, &gate},
                            {kTapFfnActivation, &act}})
      ASSERT_TRUE(store->read(bit, l, 0, 24, *out).ok());
    const auto attn_norm = weights.tensor("attn_norm", l), ffn_norm = weights.tensor("ffn_norm", l);
    const auto wo = weights.tensor("attn_output", l), wg = weights.tensor("ffn_gate", l),
               wu = weights.tensor("ffn_up", l);
    ASSERT_EQ(wu.size(), size_t(ff * d));
    for (int64_t r = 0; r < 24; ++r) {
      const std::span<const float> row_in(attn_in.data() + r * d, size_t(d)), row_ffn_in(ffn_in.data() + r * d, size_t(d));
      EXPECT_LT(rel_error(row_in, rmsnorm_row(hidden.data() + r * d, attn_norm, d, c.rms_eps)), 1e-5)
          << "attention_in layer " << l << " row " << r;
      const std::vector<double> o(attn_out.begin() + r * q, attn_out.begin() + (r + 1) * q);
      auto residual = matvec(o, wo, d);
      std::vector<float> mid(static_cast<size_t>(d));
      for (int64_t i = 0; i < d; ++i) mid[size_t(i)] = float(double(hidden[size_t(r * d + i)]) + residual[size_t(i)]);
      EXPECT_LT(rel_error(row_ffn_in, rmsnorm_row(mid.data(), ffn_norm, d, c.rms_eps)), 1e-5)
          << "ffn_in layer " << l << " row " << r;
      const std::vector<double> x(row_ffn_in.begin(), row_ffn_in.end());
      const auto g = matvec(x, wg, ff), up = matvec(x, wu, ff);
      EXPECT_LT(rel_error(std::span<const float>(gate.data() + r * ff, size_t(ff)), g), 1e-5)
          << "ffn_gate layer " << l << " row " << r;
      std::vector<double> want(static_cast<size_t>(ff));
      for (int64_t j = 0; j < ff; ++j) {
        const double gj = gate[size_t(r * ff + j)];
        want[size_t(j)] = gj / (1.0 + std::exp(-gj)) * up[size_t(j)];
      }
      EXPECT_LT(rel_error(std::span<const float>(act.data() + r * ff, size_t(ff)), want), 1e-5)
          << "ffn_activation layer " << l << " row " << r;
    }
  }
}

// Every file of a store, by name, with its bytes.
std::map<std::string, std::string> store_files(const fs::path& dir) {
  std::map<std::string, std::string> out;
  for (const auto& e : fs::directory_iterator(dir)) out[e.path().filename().string()] = read_bytes(e.path());
  return out;
}

TEST(ActivationStore, AnInterruptedCaptureResumesToTheSameBytesAndACompleteOneRunsNothing) {
  auto engine = cpu_engine();
  ASSERT_NE(engine, nullptr);
  CalibrationRequest request{write_corpus().string(), 3, 10, kTapHiddenIn | kTapFfnGate | kTapKeys};
  request.stored = true;
  const auto whole_root = test::temp_path("activations-whole"), resumed_root = test::temp_path("activations-resumed");
  engine->reset_counters();
  auto whole = capture_activations(*engine, request, whole_root);
  ASSERT_TRUE(whole.ok()) << whole.message();
  EXPECT_EQ(engine->counters().forward_calls, 3);

  // Interrupted after one sample, then in the middle of the second: its rows
  // reached some files (a partial tail), the manifest still says 1.
  auto partial = capture_activations(*engine, request, resumed_root, CaptureOptions{1});
  ASSERT_TRUE(partial.ok()) << partial.message();
  EXPECT_EQ(partial->lexically_relative(resumed_root), whole->lexically_relative(whole_root));
  auto incomplete = ActivationStore::open(*partial);
  ASSERT_FALSE(incomplete.ok());
  EXPECT_NE(incomplete.message().find("1 of 3 samples"), std::string::npos) << incomplete.message();
  EXPECT_NE(incomplete.message().find(partial->string()), std::string::npos) << incomplete.message();
  for (const auto& name : {activation_file_name(kTapHiddenIn, 0), activation_file_name(kTapKeys, 1),
                           activation_file_name(0, -1)})
    std::ofstream(*partial / name, std::ios::binary | std::ios::app) << std::string(40, '\x7f');
  EXPECT_NE(store_files(*partial), store_files(*whole));

  engine->reset_counters();
  auto resumed = capture_activations(*engine, request, resumed_root);
  ASSERT_TRUE(resumed.ok()) << resumed.message();
  EXPECT_EQ(engine->counters().forward_calls, 2) << "only the samples after the committed one";
  const auto a = store_files(*whole), b = store_files(*resumed);
  EXPECT_EQ(a.size(), 1 + 1 + 3 * size_t(engine->config().n_layers));  // manifest, tokens, (tap, layer)
  ASSERT_EQ(a.size(), b.size());
  for (const auto& [name, bytes] : a) EXPECT_TRUE(b.at(name) == bytes) << name << " differs";

  // A complete store is reused: no forward pass.
  engine->reset_counters();
  auto again = capture_activations(*engine, request, whole_root);
  ASSERT_TRUE(again.ok()) << again.message();
  EXPECT_EQ(*again, *whole);
  EXPECT_EQ(engine->counters().forward_calls, 0);
  EXPECT_EQ(store_files(*whole), a);
}

TEST(ActivationStore, CorruptFilesAndManifestsAreRefusedNamingTheFile) {
  auto engine = cpu_engine();
  ASSERT_NE(engine, nullptr);
  CalibrationRequest request{write_corpus().string(), 2, 8, kTapHiddenIn | kTapValues};
  request.stored = true;
  auto dir = capture_activations(*engine, request, test::temp_path("activations-corrupt"));
  ASSERT_TRUE(dir.ok()) << dir.message();
  ASSERT_TRUE(ActivationStore::open(*dir).ok());
  // Each case on its own copy of the store.
  auto refused = [&](const std::string& what, auto&& damage, const std::string& file, const std::string& says) {
    const auto copy = test::temp_path("activations-copy");
    fs::copy(*dir, copy, fs::copy_options::recursive);
    damage(copy);
    auto store = ActivationStore::open(copy);
    ASSERT_FALSE(store.ok()) << what;
    EXPECT_NE(store.message().find((file.empty() ? copy : copy / file).string()), std::string::npos) << what << ": " << store.message();
    EXPECT_NE(store.message().find(says), std::string::npos) << what << ": " << store.message();
  };
  const std::string values1 = activation_file_name(kTapValues, 1), manifest = kActivationManifest;
  refused("truncated", [&](const fs::path& d) { fs::resize_file(d / values1, fs::file_size(d / values1) - 4); },
          values1, "truncated");
  refused("longer", [&](const fs::path& d) { std::ofstream(d / values1, std::ios::app) << "xxxx"; }, values1,
          "its manifest says");
  refused("bad magic", [&](const fs::path& d) {
    std::fstream f(d / values1, std::ios::in | std::ios::out | std::ios::binary);
    f.write("NOPE", 4);
  }, values1, "bad magic");
  refused("missing file", [&](const fs::path& d) { fs::remove(d / "tokens.i32"); }, "tokens.i32", "missing");
  refused("missing manifest", [&](const fs::path& d) { fs::remove(d / manifest); }, manifest, "no activation store");
  auto rewrite = [&](const std::string& from, const std::string& to) {
    return [=](const fs::path& d) {
      std::string text = read_bytes(d / manifest);
      text.replace(text.find(from), from.size(), to);
      std::ofstream(d / manifest, std::ios::trunc) << text;
    };
  };
  refused("bad manifest magic", rewrite("inferlab-activations 1", "something else"), manifest, "bad magic");
  refused("bad manifest version", rewrite("inferlab-activations 1", "inferlab-activations 7"), manifest, "version");
  refused("bad manifest value", rewrite("samples 2", "samples two"), manifest, ":5: bad value of samples");
  refused("bad manifest tap", rewrite("tap values", "tap logits"), manifest, "bad tap line");
  refused("partial store", rewrite("committed 2", "committed 1"), "", "1 of 2 samples");

  // Reads outside the store are refused.
  auto store = ActivationStore::open(*dir);
  ASSERT_TRUE(store.ok());
  std::vector<float> out;
  EXPECT_FALSE(store->read(kTapValues, 0, 15, 2, out).ok());
  EXPECT_FALSE(store->read(kTapValues, 2, 0, 1, out).ok());
  EXPECT_FALSE(store->read(kTapQueries, 0, 0, 1, out).ok());
  ASSERT_TRUE(store->read(kTapValues, 1, 15, 1, out).ok());
  EXPECT_EQ(out.size(), size_t(engine->config().kv_dim()));

  // A capture refuses a store it would continue whose file lost committed rows, naming the file.
  request.samples = 3;
  const auto root = test::temp_path("activations-resume-corrupt");
  auto partial = capture_activations(*engine, request, root, CaptureOptions{2});
  ASSERT_TRUE(partial.ok()) << partial.message();
  const auto file = *partial / activation_file_name(kTapHiddenIn, 0);
  fs::resize_file(file, fs::file_size(file) - 8);
  auto resumed = capture_activations(*engine, request, root);
  ASSERT_FALSE(resumed.ok());
  EXPECT_NE(resumed.message().find(file.string()), std::string::npos) << resumed.message();
}

TEST(ActivationStore, RefusesWhatItCannotDoWithTheFigures) {
  auto engine = cpu_engine();
  ASSERT_NE(engine, nullptr);
  // A corpus too small for the requested windows says how many it got and how many were asked.
  const auto small = write_corpus(3);
  CalibrationRequest request{small.string(), 50, 64, kTapHiddenIn};
  request.stored = true;
  const auto root = test::temp_path("activations-refused");
  auto r = capture_activations(*engine, request, root);
  ASSERT_FALSE(r.ok());
  const Tokenizer& tok = engine->model().tokenizer();
  const auto n = tok.encode(read_bytes(small), false, false).size();
  const size_t body = tok.add_bos_default() && tok.bos() >= 0 ? 63 : 64;
  EXPECT_NE(r.message().find(small.string() + " has " + std::to_string(n) + " tokens"), std::string::npos)
      << r.message();
  EXPECT_NE(r.message().find(std::to_string(n / body) + " windows of 64 tokens fit, 50 were asked"),
            std::string::npos)
      << r.message();
  EXPECT_FALSE(fs::exists(root)) << "nothing is written";

  // Too little disk: the figure it needs.
  request = CalibrationRequest{write_corpus().string(), 4, 16, kTapHiddenIn | kTapFfnGate};
  const ModelConfig& c = engine->config();
  const int64_t need = 4 * 16 * (4 + int64_t(c.n_layers) * (c.n_embd + c.n_ff) * 4);
  r = capture_activations(*engine, request, root, CaptureOptions{-1, 1000});
  ASSERT_FALSE(r.ok());
  EXPECT_NE(r.message().find("needs " + std::to_string(need) + " bytes"), std::string::npos) << r.message();
  EXPECT_NE(r.message().find("1000 bytes"), std::string::npos) << r.message();
  EXPECT_FALSE(fs::exists(root));

  // Nothing to store.
  request.taps = kTapLogits;
  r = capture_activations(*engine, request, root);
  ASSERT_FALSE(r.ok());
  EXPECT_NE(r.message().find("no tap to store"), std::string::npos) << r.message();
}

// A method that calibrates from the store: it reads it through the SDK reader.
class StoreReader final : public Method {
 public:
  explicit StoreReader(int32_t samples) : samples_(samples) {}
  CalibrationRequest calibration(const ModelShape&) override {
    CalibrationRequest r{corpus, samples_, 12, kTapFfnIn | kTapFfnGate | kTapLogits};
    r.stored = true;
    return r;
  }
  void on_calibration(const CalibrationTaps&) override { ++taps_seen; }
  Status finish_calibration(const std::string&) override { return Error{"finish_calibration must not be called"}; }
  Status finish_stored_calibration(const std::string& activations, const std::string& artifacts,
                                   LayerProbe&) override {
    auto store = ActivationStore::open(activations);
    if (!store) return store.error();
    store_dir = activations;
    rows = store->rows();
    std::vector<float> batch;
    for (int64_t r = 0; r < store->rows(); r += 5) {  // mini-batches of 5 rows
      if (auto s = store->read(kTapFfnGate, 1, r, std::min<int64_t>(5, store->rows() - r), batch); !s) return s;
      for (float v : batch) gate_sum += v;
    }
    std::ofstream(fs::path(artifacts) / "gate_sum.txt") << gate_sum << "\n";
    return ok_status();
  }
  std::string corpus;
  std::string store_dir;
  int64_t rows = 0;
  double gate_sum = 0;
  int taps_seen = 0;

 private:
  int32_t samples_;
};
static_assert((hooks_of<StoreReader>() & kHookCalibrate) != 0);

TEST(ActivationStore, StoredCalibrationReadsTheStoreAndSharesIt) {
  auto engine = cpu_engine();
  ASSERT_NE(engine, nullptr);
  const auto corpus = write_corpus().string(), root = test::temp_path("activations-calibration").string();
  PluginEntry entry{"store-reader", "1.0.0", "reads the activation store", kHookCalibrate,
                    {ParamSpec::integer("p", 0, 0, 9, "any parameter")}, ""};
  auto prepare = [&](StoreReader& inner, int64_t p) {
    inner.corpus = corpus;
    ParamValues params;
    params.set("p", p);
    TrackedMethod tracked(inner, worker_state());  // as the runner wraps it
    return ensure_calibrated(tracked, entry, params, *engine, root);
  };
  engine->reset_counters();
  StoreReader first(3);
  auto a = prepare(first, 1);
  ASSERT_TRUE(a.ok()) << a.message();
  EXPECT_TRUE(a->calibrated);
  EXPECT_EQ(first.taps_seen, 0) << "a stored calibration hands no taps to on_calibration";
  EXPECT_EQ(first.store_dir, a->activation_dir.string());
  EXPECT_EQ(a->activation_dir.parent_path().parent_path(), fs::path(root) / "activations");
  EXPECT_EQ(first.rows, 36);
  EXPECT_NE(first.gate_sum, 0.0);
  EXPECT_TRUE(fs::exists(a->artifact_dir / "gate_sum.txt"));
  EXPECT_TRUE(fs::exists(a->artifact_dir / "calibration.json"));
  EXPECT_EQ(engine->counters().forward_calls, 3);

  // Other parameters: other artifacts from the same store, with no forward pass.
  StoreReader second(3);
  auto b = prepare(second, 2);
  ASSERT_TRUE(b.ok()) << b.message();
  EXPECT_TRUE(b->calibrated);
  EXPECT_NE(b->artifact_dir, a->artifact_dir);
  EXPECT_EQ(b->activation_dir, a->activation_dir);
  EXPECT_EQ(second.gate_sum, first.gate_sum);
  EXPECT_EQ(engine->counters().forward_calls, 3);

  // The same parameters again: the artifacts are found, the method is not called.
  StoreReader again(3);
  auto c = prepare(again, 1);
  ASSERT_TRUE(c.ok()) << c.message();
  EXPECT_TRUE(c->reused);
  EXPECT_TRUE(again.store_dir.empty());

  // Another request: another store, and other artifacts for the same parameters.
  StoreReader more(4);
  auto d = prepare(more, 1);
  ASSERT_TRUE(d.ok()) << d.message();
  EXPECT_TRUE(d->calibrated);
  EXPECT_NE(d->activation_dir, a->activation_dir);
  EXPECT_NE(d->artifact_dir, a->artifact_dir);
  EXPECT_EQ(more.rows, 48);
  EXPECT_EQ(engine->counters().forward_calls, 7);
}

// `inferlab capture`: writes a store; a bad tap name fails naming it.
std::pair<int, std::string> run_cli(const std::string& args) {
  const std::string command = std::string(INFERLAB_CLI_PATH) + " " + args + " 2>&1";
  std::string output;
  FILE* pipe = popen(command.c_str(), "r");
  if (pipe == nullptr) return {-1, ""};
  std::array<char, 4096> buffer{};
  for (size_t n; (n = fread(buffer.data(), 1, buffer.size(), pipe)) > 0;) output.append(buffer.data(), n);
  const int status = pclose(pipe);
  return {WIFEXITED(status) ? WEXITSTATUS(status) : -1, output};
}

TEST(ActivationStoreCli, CaptureWritesAStoreAndNamesABadTap) {
  SyntheticModelSpec spec;
  spec.name = "capture-cli";
  const auto model = test::temp_path("capture-cli.gguf");
  ASSERT_TRUE(write_synthetic_model(spec, model).ok());
  const auto corpus = write_corpus(), out = test::temp_path("capture-cli-store");
  const std::string base = "capture --model " + model.string() + " --corpus " + corpus.string() +
                           " --samples 2 --tokens 16 --out " + out.string();
  auto [code, output] = run_cli(base + " --taps hidden_in,ffn_gate,attention_in");
  ASSERT_EQ(code, 0) << output;
  const std::string prefix = "store   ";
  const size_t at = output.find(prefix);
  ASSERT_NE(at, std::string::npos) << output;
  const fs::path dir = output.substr(at + prefix.size(), output.find('\n', at) - at - prefix.size());
  EXPECT_EQ(dir.parent_path().parent_path(), out);
  auto store = ActivationStore::open(dir);
  ASSERT_TRUE(store.ok()) << store.message();
  EXPECT_EQ(store->taps(), kTapHiddenIn | kTapFfnGate | kTapAttentionIn);
  EXPECT_EQ(store->rows(), 32);
  EXPECT_NE(output.find("rows    32 (2 samples of 16 tokens)"), std::string::npos) << output;
  EXPECT_NE(output.find("bytes   " + std::to_string(store->bytes()) + " "), std::string::npos) << output;
  int64_t on_disk = 0;
  for (const auto& e : fs::directory_iterator(dir))
    if (e.path().filename() != kActivationManifest) on_disk += int64_t(e.file_size());
  EXPECT_EQ(on_disk, store->bytes());

  auto [bad, message] = run_cli(base + " --taps hidden_in,hiden_out");
  EXPECT_NE(bad, 0);
  EXPECT_NE(message.find("unknown tap 'hiden_out'"), std::string::npos) << message;
  EXPECT_EQ(std::count(message.begin(), message.end(), '\n'), 1) << message;
  auto [logits, why] = run_cli(base + " --taps logits");
  EXPECT_NE(logits, 0);
  EXPECT_NE(why.find("logits are not stored"), std::string::npos) << why;
}

}  // namespace test_activation_store
}  // namespace inferlab
