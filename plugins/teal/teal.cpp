// TEAL (Liu et al., "Training-Free Activation Sparsity in Large Language
// Models", ICLR 2025): every projection's input entries below a magnitude
// threshold are taken as zero, and the weight columns they would multiply are
// not read. Thresholds per (layer, projection) come from calibration: the
// magnitude below which `sparsity` of that projection's calibration inputs
// fell (uniform allocation). The engine carries the thresholds out
// (Method::activation_sparsity); this plugin only calibrates and declares them.
#include <algorithm>
#include <array>
#include <filesystem>
#include <limits>

#include "inferlab/plugin_export.h"
#include "inferlab/quantiles.h"

namespace {

using namespace inferlab;

const std::vector<std::string> kColumns = {"q", "k", "v", "o", "gate", "up", "down"};
constexpr const char* kThresholdFile = "thresholds.tsv";

struct Options {
  double sparsity = 0.5;
  LayerSchedule layer_sparsity;  // overrides `sparsity` on the layers it names
  std::string projections = "all";
  int32_t dense_layers = 0;
  CalibrationRequest calibration;  // corpus, windows, tokens (taps set here)
};

class Teal final : public Method {
 public:
  explicit Teal(Options o) : o_(std::move(o)) {}

  CalibrationRequest calibration(const ModelShape& shape) override {
    histograms_.assign(size_t(shape.n_layers), {});
    if (all_dense(shape)) return {};  // nothing to calibrate: every threshold is "dense"
    return o_.calibration;
  }
  void on_calibration(const CalibrationTaps& t) override {
    if (t.layer < 0 || size_t(t.layer) >= histograms_.size()) return;
    auto& h = histograms_[size_t(t.layer)];
    h[0].add(t.attention_in);
    h[1].add(t.attention_out);
    h[2].add(t.ffn_in);
    h[3].add(t.ffn_activation);
  }
  Status finish_calibration(const std::string& dir) override {
    const int32_t L = int32_t(histograms_.size());
    std::vector<std::vector<double>> rows(static_cast<size_t>(L));
    for (int32_t l = 0; l < L; ++l) {
      static constexpr int kInput[] = {0, 0, 0, 1, 2, 2, 3};  // which tap each projection reads
      for (int p = 0; p < kSparseProjections; ++p) {
        const double s = target(l, p);
        rows[size_t(l)].push_back(s > 0 ? histograms_[size_t(l)][size_t(kInput[p])].quantile(s) : -1.0);
      }
    }
    return write_layer_table((std::filesystem::path(dir) / kThresholdFile).string(), kColumns, rows);
  }

  Status on_load(const LoadContext& ctx) override {
    sparsity_ = {};
    if (all_dense(ctx.shape)) return ok_status();
    auto table = read_layer_table((std::filesystem::path(ctx.artifact_dir) / kThresholdFile).string(), kColumns,
                                  ctx.shape.n_layers);
    if (!table) return table.error();
    for (const auto& row : *table) {
      std::array<float, kSparseProjections> t{};
      for (int p = 0; p < kSparseProjections; ++p) t[size_t(p)] = float(row[size_t(p)]);
      sparsity_.input_threshold.push_back(t);
    }
    return ok_status();
  }

  ActivationSparsity activation_sparsity() const override { return sparsity_; }

 private:
  // The fraction of projection p's inputs to zero at layer l (0: dense).
  double target(int32_t l, int p) const {
    if (l < o_.dense_layers) return 0.0;
    const bool attention = p <= 3;
    if ((o_.projections == "mlp" && attention) || (o_.projections == "attention" && !attention)) return 0.0;
    return o_.layer_sparsity.at(l, o_.sparsity);
  }
  bool all_dense(const ModelShape& shape) const {
    for (int32_t l = 0; l < shape.n_layers; ++l)
      for (int p = 0; p < kSparseProjections; ++p)
        if (target(l, p) > 0) return false;
    return true;
  }

  Options o_;
  std::vector<std::array<MagnitudeHistogram, 4>> histograms_;  // per layer: attention in, attention out, FFN in, FFN activation
  ActivationSparsity sparsity_;
};

class TealPlugin final : public Plugin {
 public:
  PluginInfo info() const override {
    std::vector<ParamSpec> params = {
        ParamSpec::real("sparsity", 0.5, 0.0, 0.99, "fraction of each projection's input entries taken as zero"),
        ParamSpec::schedule("layer_sparsity", "", 0.0, 0.99,
                            "per-layer sparsity (e.g. \"0-3=0.3; 4-29=0.5\"); layers it names override `sparsity`"),
        ParamSpec::string("projections", "all", {"all", "mlp", "attention"},
                          "which projections are sparse: all seven, gate/up/down, or q/k/v/o"),
        ParamSpec::dense_layers(0)};
    for (ParamSpec& spec : ParamSpec::calibration(16, 256)) params.push_back(std::move(spec));
    return {"teal", "1.0.0", "training-free activation sparsity: small projection inputs skipped (Liu et al. 2025)",
            hooks_of<Teal>(), std::move(params)};
  }
  Result<std::unique_ptr<Method>> create(const ParamValues& p) const override {
    Options o;
    o.sparsity = p.get_float("sparsity");
    o.layer_sparsity = p.get_schedule("layer_sparsity");
    o.projections = p.get_string("projections");
    o.dense_layers = int32_t(std::min<int64_t>(p.get_int("dense_layers"), std::numeric_limits<int32_t>::max()));
    o.calibration = calibration_request(p, kTapAttentionIn | kTapAttentionOut | kTapFfnIn | kTapFfnActivation);
    return std::unique_ptr<Method>(std::make_unique<Teal>(std::move(o)));
  }
};

}  // namespace

INFERLAB_PLUGIN(TealPlugin)
