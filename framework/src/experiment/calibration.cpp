#include "experiment/calibration.h"

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include <chrono>
#include <fstream>

#include "datasets/tasks.h"
#include "experiment/activation_store.h"
#include "experiment/config.h"
#include "model/model.h"
#include "plugins/method_context.h"

namespace inferlab {

namespace {

constexpr const char* kDoneMarker = "calibration.json";

// Hands each layer's taps of one sample to the method.
class Tapper final : public ForwardObserver {
 public:
  Tapper(Method& method, uint32_t taps) : method_(method), taps_(taps) {}
  uint32_t taps() const override { return taps_; }
  void on_layer(const CalibrationTaps& taps) override {
    CalibrationTaps t = taps;
    t.sample = sample;
    method_.on_calibration(t);
  }
  int32_t sample = 0;

 private:
  Method& method_;
  uint32_t taps_;
};

Status calibrate(Method& method, const CalibrationRequest& request, Engine& engine, const std::filesystem::path& dir) {
  auto windows = corpus_windows(engine.model().tokenizer(), request.corpus, request.samples, request.tokens, 0);
  if (!windows) return Error{"calibration: " + windows.message()};
  if (auto s = engine.set_method(nullptr, 0); !s) return s;
  Tapper tapper(method, request.taps);
  std::vector<float> logits;
  const int64_t vocab = engine.config().n_vocab;
  for (size_t i = 0; i < windows->size(); ++i) {
    const auto& tokens = (*windows)[i];
    tapper.sample = int32_t(i);
    auto seq = engine.new_sequence();
    logits.clear();
    const bool want_logits = (request.taps & kTapLogits) != 0;
    auto s = engine.forward(*seq, tokens, want_logits ? 0 : int64_t(tokens.size()),
                            [&](int64_t, std::span<const float> row) { logits.insert(logits.end(), row.begin(), row.end()); },
                            &tapper);
    if (!s) return Error{"calibration: " + s.message()};
    if (want_logits) {
      CalibrationTaps t;
      t.sample = int32_t(i), t.layer = -1, t.n_tokens = int32_t(tokens.size()), t.tokens = tokens;
      t.logits = std::span<const float>(logits.data(), tokens.size() * size_t(vocab));
      method.on_calibration(t);
    }
  }
  if (auto s = method.finish_calibration(dir.string()); !s) return Error{"calibration: " + s.message()};
  return ok_status();
}

// The engine's single layers, for a method's calibration (no method is set
// meanwhile). A search over many layer runs can take minutes: each new layer
// it reaches is said on stderr, with the runs so far.
class EngineProbe final : public LayerProbe {
 public:
  explicit EngineProbe(Engine& engine) : engine_(engine), start_(std::chrono::steady_clock::now()) {}
  Status layer_output(int32_t layer, std::span<const float> input, int32_t window, const ActivationSparsity& sparsity,
                      std::vector<float>& output) override {
    if (layer != layer_) {
      const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - start_).count();
      fmt::print(stderr, "calibration: layer probe at layer {} of {} ({} layer runs, {:.0f} s)\n", layer,
                 engine_.config().n_layers, runs_, s);
      layer_ = layer;
    }
    ++runs_;
    return engine_.layer_output(layer, input, window, sparsity, output);
  }
  Status predict(std::span<const float> hidden, const ExitMap* head, float norm_eps, std::vector<int32_t>& top1,
                 std::vector<float>& margin) override {
    return engine_.predict_rows(hidden, head, norm_eps, top1, margin);
  }

 private:
  Engine& engine_;
  std::chrono::steady_clock::time_point start_;
  int32_t layer_ = -1;
  int64_t runs_ = 0;
};

// CalibrationRequest::stored: the taps go to the activation store (captured,
// continued or reused), which the method then reads.
Status calibrate_stored(Method& method, const CalibrationRequest& request, Engine& engine,
                        const std::filesystem::path& dir, const std::filesystem::path& store_root) {
  auto store = capture_activations(engine, request, store_root);
  if (!store) return store.error();
  EngineProbe probe(engine);
  if (auto s = method.finish_stored_calibration(store->string(), dir.string(), probe); !s)
    return Error{"calibration: " + s.message()};
  return ok_status();
}

}  // namespace

std::string arithmetic(const Engine& engine) {
  if (engine.backend() == BackendKind::Cpu) return "cpu-f32";
  return engine.options().gpu_dtype == GpuDType::BF16 ? "cuda-bf16" : "cuda-f16";
}

Result<std::string> corpus_key(const std::string& corpus) {
  if (corpus == "kv_retrieval") return corpus;
  auto path = resolve_corpus(corpus);
  if (!path) return path.error();
  auto digest = sha256_file(path->string());
  if (!digest) return digest.error();
  return "sha256:" + *digest;
}

Result<std::filesystem::path> calibration_dir(const PluginEntry& plugin, const ParamValues& params,
                                              const CalibrationRequest& request,
                                              const std::string& model_checksum, const std::string& arithmetic,
                                              const std::filesystem::path& artifact_root) {
  nlohmann::json key = {{"plugin", plugin.name}, {"version", plugin.version}, {"arithmetic", arithmetic},
                        {"samples", request.samples},
                        {"tokens", request.tokens}, {"taps", request.taps}, {"corpus", request.corpus}};
  if (request.corpus != "kjv") {  // a file: keyed by its content ("kjv" by its name, as it always was)
    auto corpus = corpus_key(request.corpus);
    if (!corpus) return Error{fmt::format("plugin {}: calibration corpus: {}", plugin.name, corpus.message())};
    key["corpus"] = *corpus;
  }
  if (request.stored) {  // a new store means new artifacts
    auto store = activation_store_key(request, arithmetic);
    if (!store) return Error{fmt::format("plugin {}: {}", plugin.name, store.message())};
    key["activation_store"] = *store;
  }
  for (const ParamSpec& spec : plugin.params) {
    if (!params.has(spec.name) || !spec.keys_calibration) continue;
    const ParamValue& value = params.all().at(spec.name);
    auto digest = path_digest(spec, value);
    if (!digest) return Error{fmt::format("parameter {} of plugin {}: {}", spec.name, plugin.name, digest.message())};
    key["params"][spec.name] = digest->empty() ? param_value_to_string(value) : *digest;
  }
  return artifact_dir(plugin.name, model_checksum, artifact_root) / sha256_hex(key.dump()).substr(0, 16);
}

Result<PreparedMethod> ensure_calibrated(Method& method, const PluginEntry& plugin, const ParamValues& params,
                                         Engine& engine, const std::filesystem::path& artifact_root) {
  PreparedMethod out;
  if ((plugin.hooks & kHookCalibrate) == 0) return out;
  try {
    out.request = method.calibration(engine.shape());
  } catch (const std::exception& e) {
    return Error{fmt::format("plugin {}: calibration() threw: {}", plugin.name, e.what())};
  }
  const CalibrationRequest& request = out.request;
  if (request.samples < 0 || (request.samples > 0 && request.tokens < 2))
    return Error{fmt::format("plugin {}: calibration asks for {} samples of {} tokens", plugin.name, request.samples,
                             request.tokens)};
  if (request.samples == 0) return out;
  auto dir = calibration_dir(plugin, params, request, engine.model().checksum(), arithmetic(engine), artifact_root);
  if (!dir) return dir.error();
  out.artifact_dir = *dir;
  const auto store_root = default_activation_root(artifact_root);
  if (request.stored) {
    auto store = activation_store_dir(engine, request, store_root);
    if (!store) return Error{fmt::format("plugin {}: {}", plugin.name, store.message())};
    out.activation_dir = *store;
  }
  std::error_code ec;
  if (std::filesystem::exists(*dir / kDoneMarker, ec)) {
    out.reused = true;
    return out;
  }
  std::filesystem::create_directories(*dir, ec);
  if (ec) return Error{fmt::format("plugin {}: cannot create {}: {}", plugin.name, dir->string(), ec.message())};
  nlohmann::json record = {{"plugin", plugin.name}, {"version", plugin.version},
                                 {"model_checksum", engine.model().checksum()}, {"arithmetic", arithmetic(engine)},
                                 {"corpus", request.corpus},
                                 {"samples", request.samples}, {"tokens", request.tokens}, {"taps", request.taps},
                                 {"stored", request.stored}};
  if (request.stored) record["activation_store"] = out.activation_dir.string();
  try {
    auto s = request.stored ? calibrate_stored(method, request, engine, *dir, store_root)
                            : calibrate(method, request, engine, *dir);
    if (!s) return Error{fmt::format("plugin {}: {}", plugin.name, s.message())};
    // Written last: a folder without it is an unfinished calibration, done again.
    std::ofstream(*dir / kDoneMarker) << record.dump(1) << "\n";
  } catch (const std::exception& e) {
    return Error{fmt::format("plugin {}: calibration threw: {}", plugin.name, e.what())};
  }
  out.calibrated = true;
  return out;
}

Result<PreparedMethod> prepare_method(Method& method, const PluginEntry& plugin, const ParamValues& params,
                                      Engine& engine, const std::filesystem::path& artifact_root,
                                      WeightOverrides* overrides) {
  auto out = ensure_calibrated(method, plugin, params, engine, artifact_root);
  if (!out) return out;
  if (auto s = load_method(method, plugin, engine, artifact_root, overrides, out->artifact_dir); !s) return s.error();
  return out;
}

}  // namespace inferlab
