// CATS (Lee et al., "CATS: Contextually-Aware Thresholding for Sparsity in
// Large Language Models", COLM 2024): in each SwiGLU FFN the gate runs dense;
// the neurons whose |SiLU(gate)| is at or below a per-layer threshold are
// zero, so the up projection computes only the others and the down projection
// reads only their columns. The threshold is the magnitude below which
// `sparsity` of the layer's calibration |SiLU(gate)| values fell. The engine
// carries it out (ActivationSparsity::gate_threshold); this plugin calibrates.
#include <algorithm>
#include <cmath>
#include <filesystem>
#include <limits>

#include "inferlab/plugin_export.h"
#include "inferlab/quantiles.h"

namespace {

using namespace inferlab;

const std::vector<std::string> kColumns = {"gate_threshold"};
constexpr const char* kThresholdFile = "thresholds.tsv";

struct Options {
  double sparsity = 0.5;
  LayerSchedule layer_sparsity;
  int32_t dense_layers = 0;
  CalibrationRequest calibration;  // corpus, windows, tokens (taps set here)
};

class Cats final : public Method {
 public:
  explicit Cats(Options o) : o_(std::move(o)) {}

  CalibrationRequest calibration(const ModelShape& shape) override {
    histograms_.assign(size_t(shape.n_layers), {});
    if (all_dense(shape)) return {};
    return o_.calibration;
  }
  void on_calibration(const CalibrationTaps& t) override {
    if (t.layer < 0 || size_t(t.layer) >= histograms_.size()) return;
    silu_.resize(t.ffn_gate.size());
    for (size_t i = 0; i < silu_.size(); ++i) silu_[i] = t.ffn_gate[i] / (1.0f + std::exp(-t.ffn_gate[i]));
    histograms_[size_t(t.layer)].add(silu_);
  }
  Status finish_calibration(const std::string& dir) override {
    std::vector<std::vector<double>> rows;
    for (int32_t l = 0; l < int32_t(histograms_.size()); ++l) {
      const double s = target(l);
      rows.push_back({s > 0 ? histograms_[size_t(l)].quantile(s) : -1.0});
    }
    return write_layer_table((std::filesystem::path(dir) / kThresholdFile).string(), kColumns, rows);
  }

  Status on_load(const LoadContext& ctx) override {
    sparsity_ = {};
    if (all_dense(ctx.shape)) return ok_status();
    auto table = read_layer_table((std::filesystem::path(ctx.artifact_dir) / kThresholdFile).string(), kColumns,
                                  ctx.shape.n_layers);
    if (!table) return table.error();
    for (const auto& row : *table) sparsity_.gate_threshold.push_back(float(row[0]));
    return ok_status();
  }

  ActivationSparsity activation_sparsity() const override { return sparsity_; }

 private:
  double target(int32_t l) const { return l < o_.dense_layers ? 0.0 : o_.layer_sparsity.at(l, o_.sparsity); }
  bool all_dense(const ModelShape& shape) const {
    for (int32_t l = 0; l < shape.n_layers; ++l)
      if (target(l) > 0) return false;
    return true;
  }

  Options o_;
  std::vector<MagnitudeHistogram> histograms_;  // per layer: |SiLU(gate)|
  std::vector<float> silu_;
  ActivationSparsity sparsity_;
};

class CatsPlugin final : public Plugin {
 public:
  PluginInfo info() const override {
    std::vector<ParamSpec> params = {
        ParamSpec::real("sparsity", 0.5, 0.0, 0.99, "fraction of each layer's FFN neurons taken as zero"),
        ParamSpec::schedule("layer_sparsity", "", 0.0, 0.99,
                            "per-layer sparsity (e.g. \"0-3=0.3; 4-29=0.5\"); layers it names override `sparsity`"),
        ParamSpec::dense_layers(0)};
    for (ParamSpec& spec : ParamSpec::calibration(16, 256)) params.push_back(std::move(spec));
    return {"cats", "1.0.0", "SwiGLU neurons with small |SiLU(gate)| skipped in up and down (Lee et al. 2024)",
            hooks_of<Cats>(), std::move(params)};
  }
  Result<std::unique_ptr<Method>> create(const ParamValues& p) const override {
    Options o;
    o.sparsity = p.get_float("sparsity");
    o.layer_sparsity = p.get_schedule("layer_sparsity");
    o.dense_layers = int32_t(std::min<int64_t>(p.get_int("dense_layers"), std::numeric_limits<int32_t>::max()));
    o.calibration = calibration_request(p, kTapFfnGate);
    return std::unique_ptr<Method>(std::make_unique<Cats>(std::move(o)));
  }
};

}  // namespace

INFERLAB_PLUGIN(CatsPlugin)
