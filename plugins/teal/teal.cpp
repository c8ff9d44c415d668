// TEAL (Liu et al., "Training-Free Activation Sparsity in Large Language
// Models", ICLR 2025): every projection's input entries below a magnitude
// threshold are taken as zero, and the weight columns they would multiply are
// not read. Thresholds per (layer, projection) come from calibration: the
// magnitude below which a given fraction of that projection's calibration
// inputs fell. The fraction is either the same for every projection
// (`allocation = uniform`) or TEAL's block-wise greedy allocation
// (`allocation = greedy`): per layer, starting dense, repeatedly raise by one
// step the projection whose raise least increases the error of the layer's
// output on the calibration rows (LayerProbe: the engine runs the layer), a
// step being worth the same share of the layer's weights for every
// projection, until the layer's weighted sparsity reaches the target. The
// engine carries the thresholds out (Method::activation_sparsity); this
// plugin only calibrates and declares them.
#include <algorithm>
#include <array>
#include <cmath>
#include <filesystem>
#include <limits>

#include "inferlab/activations.h"
#include "inferlab/plugin_export.h"
#include "inferlab/quantiles.h"

namespace {

using namespace inferlab;

const std::vector<std::string> kColumns = {"q", "k", "v", "o", "gate", "up", "down"};
constexpr const char* kThresholdFile = "thresholds.tsv";
constexpr const char* kGreedyFile = "greedy.tsv";  // per layer: each projection's sparsity, the errors
const std::vector<std::string> kGreedyColumns = {"q",    "k",         "v",     "o", "gate", "up", "down",
                                                 "effective", "error", "uniform_error"};
constexpr int kInput[] = {0, 0, 0, 1, 2, 2, 3};  // which input each projection reads
constexpr double kMaxSparsity = 0.99;

struct Options {
  bool greedy = false;
  double step = 0.05;           // greedy: a step's share of the layer's weights, as a sparsity of q
  double last_fraction = 0.25;  // greedy: the error counts each window's last rows only
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
    shape_ = shape;
    histograms_.assign(size_t(shape.n_layers), {});
    if (all_dense(shape)) return {};  // nothing to calibrate: every threshold is "dense"
    return o_.calibration;
  }

  // Greedy allocation: the store's inputs of each projection give the
  // histograms, its layer inputs the rows each candidate is measured on.
  Status finish_stored_calibration(const std::string& store_dir, const std::string& dir, LayerProbe& probe) override {
    auto store = ActivationStore::open(store_dir);
    if (!store) return store.error();
    const ModelShape& m = shape_;
    const int32_t L = m.n_layers;
    if (store->n_layers() != L || store->width(kTapHiddenIn) != m.n_embd ||
        store->width(kTapAttentionIn) != m.n_embd || store->width(kTapAttentionOut) != m.n_heads * m.head_dim ||
        store->width(kTapFfnIn) != m.n_embd || store->width(kTapFfnActivation) != m.n_ff)
      return Error{store_dir + ": the activation store does not hold this model's layer, attention and FFN inputs"};
    // Each projection's share of the layer's weights (TEAL weighs by them).
    const int64_t qd = int64_t(m.n_heads) * m.head_dim, kvd = int64_t(m.n_kv_heads) * m.head_dim;
    const std::array<double, kSparseProjections> size = {
        double(qd * m.n_embd),   double(kvd * m.n_embd),   double(kvd * m.n_embd), double(m.n_embd * qd),
        double(m.n_ff * m.n_embd), double(m.n_ff * m.n_embd), double(m.n_embd * m.n_ff)};
    const int64_t rows = store->rows();
    const int32_t window = store->tokens_per_sample();
    std::vector<std::vector<double>> thresholds(static_cast<size_t>(L)), table(static_cast<size_t>(L));
    std::vector<float> input, target, out, chunk;
    for (int32_t l = 0; l < L; ++l) {
      std::array<MagnitudeHistogram, 4> h;
      static constexpr uint32_t kTaps[] = {kTapAttentionIn, kTapAttentionOut, kTapFfnIn, kTapFfnActivation};
      for (int i = 0; i < 4; ++i) {
        if (auto st = store->read(kTaps[i], l, 0, rows, chunk); !st) return st;
        h[size_t(i)].add(chunk);
      }
      std::array<bool, kSparseProjections> allowed{};
      double weight = 0;
      for (int p = 0; p < kSparseProjections; ++p) {
        allowed[size_t(p)] = target_of(l, p) > 0;
        if (allowed[size_t(p)]) weight += size[size_t(p)];
      }
      std::array<double, kSparseProjections> s{};
      auto threshold_row = [&](const std::array<double, kSparseProjections>& sp) {
        std::array<float, kSparseProjections> t{};
        for (int p = 0; p < kSparseProjections; ++p)
          t[size_t(p)] = sp[size_t(p)] > 0 ? float(h[size_t(kInput[p])].quantile(sp[size_t(p)])) : -1.0f;
        return t;
      };
      auto effective = [&](const std::array<double, kSparseProjections>& sp) {
        double sum = 0;
        for (int p = 0; p < kSparseProjections; ++p)
          if (allowed[size_t(p)]) sum += sp[size_t(p)] * size[size_t(p)];
        return weight > 0 ? sum / weight : 0.0;
      };
      const double goal = weight > 0 ? o_.layer_sparsity.at(l, o_.sparsity) : 0.0;
      double error = 0, uniform_error = 0;
      if (goal > 0) {
        if (auto st = store->read(kTapHiddenIn, l, 0, rows, input); !st) return st;
        ActivationSparsity dense;
        if (auto st = probe.layer_output(l, input, window, dense, target); !st) return st;
        auto error_of = [&](const std::array<double, kSparseProjections>& sp) -> Result<double> {
          ActivationSparsity a;
          a.input_threshold.assign(size_t(L), {-1, -1, -1, -1, -1, -1, -1});
          a.input_threshold[size_t(l)] = threshold_row(sp);
          if (auto st = probe.layer_output(l, input, window, a, out); !st) return st.error();
          return output_error(target, out, window);
        };
        // A step raises projection p by step * size(q) / size(p): the same weight for every projection.
        auto raised = [&](int p) {
          auto next = s;
          next[size_t(p)] = std::min(kMaxSparsity, s[size_t(p)] + o_.step * size[0] / size[size_t(p)]);
          return next;
        };
        while (effective(s) < goal - 1e-9) {
          int best = -1;
          double best_error = std::numeric_limits<double>::infinity();
          for (int p = 0; p < kSparseProjections; ++p) {
            if (!allowed[size_t(p)] || s[size_t(p)] >= kMaxSparsity) continue;
            auto e = error_of(raised(p));
            if (!e) return e.error();
            if (*e < best_error) best_error = *e, best = p;
          }
          if (best < 0) break;  // every projection at the cap
          s = raised(best);
          error = best_error;
        }
        // The uniform allocation at the same weighted sparsity, for the record.
        std::array<double, kSparseProjections> even{};
        for (int p = 0; p < kSparseProjections; ++p) even[size_t(p)] = allowed[size_t(p)] ? effective(s) : 0.0;
        auto e = error_of(even);
        if (!e) return e.error();
        uniform_error = *e;
      }
      const auto t = threshold_row(s);
      thresholds[size_t(l)].assign(t.begin(), t.end());
      table[size_t(l)].assign(s.begin(), s.end());
      table[size_t(l)].insert(table[size_t(l)].end(), {effective(s), error, uniform_error});
    }
    if (auto st = write_layer_table((std::filesystem::path(dir) / kGreedyFile).string(), kGreedyColumns, table); !st)
      return st;
    return write_layer_table((std::filesystem::path(dir) / kThresholdFile).string(), kColumns, thresholds);
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
      for (int p = 0; p < kSparseProjections; ++p) {
        const double s = target_of(l, p);
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
  // The error of a layer's output rows against the dense ones: TEAL's mean
  // over rows of the L2 distance, counting each window's last rows only.
  double output_error(const std::vector<float>& dense, const std::vector<float>& got, int32_t window) const {
    const int64_t d = shape_.n_embd, rows = int64_t(dense.size()) / d;
    const int64_t first = std::min<int64_t>(window - 1, int64_t(double(window) * (1.0 - o_.last_fraction)));
    double sum = 0;
    int64_t counted = 0;
    for (int64_t r = 0; r < rows; ++r) {
      if (r % window < first) continue;
      double ss = 0;
      for (int64_t i = 0; i < d; ++i) {
        const double diff = double(dense[size_t(r * d + i)]) - got[size_t(r * d + i)];
        ss += diff * diff;
      }
      sum += std::sqrt(ss);
      ++counted;
    }
    return counted > 0 ? sum / double(counted) : 0.0;
  }

  // The fraction of projection p's inputs to zero at layer l (0: dense); with
  // the greedy allocation, whether p may become sparse (> 0) and the layer's target.
  double target_of(int32_t l, int p) const {
    if (l < o_.dense_layers) return 0.0;
    const bool attention = p <= 3;
    if ((o_.projections == "mlp" && attention) || (o_.projections == "attention" && !attention)) return 0.0;
    return o_.layer_sparsity.at(l, o_.sparsity);
  }
  bool all_dense(const ModelShape& shape) const {
    for (int32_t l = 0; l < shape.n_layers; ++l)
      for (int p = 0; p < kSparseProjections; ++p)
        if (target_of(l, p) > 0) return false;
    return true;
  }

  Options o_;
  ModelShape shape_;
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
        ParamSpec::dense_layers(0),
        ParamSpec::string("allocation", "uniform", {"uniform", "greedy"},
                          "uniform: every projection at `sparsity`; greedy: TEAL's block-wise search per layer, "
                          "`sparsity` as the layer's weighted target"),
        ParamSpec::real("greedy_step", 0.05, 0.001, 0.5,
                        "greedy: one step raises a projection's sparsity by this times size(q) / size(projection)"),
        ParamSpec::real("greedy_last_fraction", 0.25, 0.01, 1.0,
                        "greedy: the output error counts this last fraction of each calibration window")};
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
    o.greedy = p.get_string("allocation") == "greedy";
    o.step = p.get_float("greedy_step");
    o.last_fraction = p.get_float("greedy_last_fraction");
    o.calibration = calibration_request(p, kTapAttentionIn | kTapAttentionOut | kTapFfnIn | kTapFfnActivation |
                                               (o.greedy ? kTapHiddenIn : 0u));
    o.calibration.stored = o.greedy;  // the search reads the store and runs layers on it
    return std::unique_ptr<Method>(std::make_unique<Teal>(std::move(o)));
  }
};

}  // namespace

INFERLAB_PLUGIN(TealPlugin)
