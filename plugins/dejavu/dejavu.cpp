// Deja Vu (Liu et al., "Deja Vu: Contextual Sparsity for Efficient LLMs at
// Inference Time", ICML 2023): per token and layer a small, input-dependent
// set of FFN neurons and attention heads gives nearly the dense output; small
// predictors, trained on dense activations, choose that set before the layer
// runs, and only it is computed.
//
//   predictor  the engine runs the trained predictors itself
//              (Method::component_predictors; on CUDA on the device, on a side
//              stream): layer l's neuron predictor reads layer l's input
//              residual (RMS-normalized, without the norm's gain, which the
//              first linear absorbs) and keeps the top ceil(neuron_keep *
//              n_ff) neurons; its head predictor reads layer l-1's input (one
//              layer of lookahead; layer 0 its own) and keeps the top
//              ceil(head_keep * n_heads) query heads. Gate/up read only the
//              kept neurons' rows and down their columns; Q and O only the
//              kept heads'. A call of several rows (prefill) computes the
//              union of its rows' choices.
//   oracle     the engine chooses per row from the layer's own dense values
//              (ComponentMask::oracle_neurons / oracle_heads): the bound a
//              perfect predictor would reach, with no saving.
//
// Training (finish_stored_calibration) reads an activation store: labels are
// the top label_fraction of |silu(gate) * up| per row (SwiGLU has no exact
// zeros) and the top head_label_fraction of the heads by output L2 norm;
// low-rank heads in -> rank -> out, balanced BCE, AdamW, early stopping on the
// validation recall at the runtime budget (inferlab/train.h).
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <limits>
#include <numeric>

#include "inferlab/activations.h"
#include "inferlab/plugin_export.h"
#include "inferlab/quantiles.h"
#include "inferlab/train.h"

namespace {

using namespace inferlab;
namespace fs = std::filesystem;

constexpr const char* kMetricsFile = "metrics.tsv";
const std::vector<std::string> kColumns = {"neuron_k",          "neuron_recall",   "neuron_precision",
                                           "neuron_val_loss",   "neuron_best_epoch", "head_k",
                                           "head_recall",       "head_precision",  "head_best_epoch"};

// ceil(fraction * n), at least 1 and at most n (a hair below the product so
// that 0.3 * 10 is 3, not 4).
int32_t count_of(double fraction, int32_t n) {
  return std::clamp(int32_t(std::ceil(fraction * double(n) - 1e-9)), 1, std::max(n, 1));
}

std::string checkpoint(const std::string& dir, const char* kind, int32_t layer) {
  char name[32];
  std::snprintf(name, sizeof name, "%s.%02d.head", kind, int(layer));
  return (fs::path(dir) / name).string();
}

// The predictors' input: each row divided by its RMS, the model's RMSNorm
// without its per-channel gain (the predictor's first linear absorbs that;
// train::rms_scale_rows, as the engine's predictors read it).
constexpr float kNormEps = 1e-5f;

// The k largest of z (NaN smallest, ties to the lower index) into `order`'s
// first k entries, ascending by index.
void top_k(const float* z, int32_t n, int32_t k, std::vector<int32_t>& order) {
  order.resize(size_t(n));
  std::iota(order.begin(), order.end(), 0);
  const auto key = [z](int32_t j) { return std::isnan(z[j]) ? -std::numeric_limits<float>::infinity() : z[j]; };
  std::nth_element(order.begin(), order.begin() + (k - 1), order.end(), [&](int32_t a, int32_t b) {
    return key(a) > key(b) || (key(a) == key(b) && a < b);
  });
  std::sort(order.begin(), order.begin() + k);
}

struct Options {
  bool oracle = false;
  double neuron_keep = 0.25, head_keep = 1.0;
  LayerSchedule layer_neuron_keep, layer_head_keep;
  int32_t dense_layers = 0, rank = 128;
  double label_fraction = 0.25, head_label_fraction = 0.5;
  CalibrationRequest calibration;  // corpus, windows, tokens, the taps (stored)
  int32_t epochs = 20;
  uint64_t seed = 0;
};

class DejaVu final : public Method {
 public:
  explicit DejaVu(Options o) : o_(std::move(o)) {}

  CalibrationRequest calibration(const ModelShape& shape) override {
    shape_ = shape;
    if (o_.oracle || !any_sparse(shape)) return {};
    // Every tap whatever is trained: one store serves every parameter set.
    return o_.calibration;
  }

  Status finish_stored_calibration(const std::string& store_dir, const std::string& dir, LayerProbe&) override {
    auto store = ActivationStore::open(store_dir);
    if (!store) return store.error();
    const ModelShape& s = shape_;
    const int32_t hw = s.n_heads * s.head_dim;
    if (store->width(kTapHiddenIn) != s.n_embd || store->width(kTapFfnActivation) != s.n_ff ||
        store->width(kTapAttentionOut) != hw || store->n_layers() != s.n_layers)
      return Error{store_dir + ": the activation store does not hold hidden_in, ffn_activation and attention_out "
                               "of this model's shape"};
    const int64_t rows = store->rows();
    auto features = [&](int32_t layer, std::vector<float>& x) -> Status {
      if (auto st = store->read(kTapHiddenIn, layer, 0, rows, x); !st) return st;
      train::rms_scale_rows(x, s.n_embd, kNormEps);
      return ok_status();
    };
    std::vector<std::vector<double>> table(size_t(s.n_layers), std::vector<double>(kColumns.size(), -1.0));
    std::vector<float> x, chunk;
    std::vector<uint8_t> labels;
    std::vector<int32_t> order;
    constexpr int64_t kChunk = 1024;
    for (int32_t l = 0; l < s.n_layers; ++l) {
      auto& row = table[size_t(l)];
      if (sparse_neurons(l)) {  // labels: the top label_fraction of |silu(g) * u| per row
        if (auto st = features(l, x); !st) return st;
        const int32_t n_pos = count_of(o_.label_fraction, s.n_ff);
        labels.assign(size_t(rows) * size_t(s.n_ff), 0);
        for (int64_t r0 = 0; r0 < rows; r0 += kChunk) {
          const int64_t n = std::min(kChunk, rows - r0);
          if (auto st = store->read(kTapFfnActivation, l, r0, n, chunk); !st) return st;
          for (float& v : chunk) v = std::fabs(v);
          for (int64_t r = 0; r < n; ++r) {
            top_k(chunk.data() + r * s.n_ff, s.n_ff, n_pos, order);
            for (int32_t i = 0; i < n_pos; ++i) labels[size_t((r0 + r) * s.n_ff + order[size_t(i)])] = 1;
          }
        }
        const int32_t k = count_of(neuron_keep(l), s.n_ff);
        auto m = fit(x, s.n_embd, labels, s.n_ff, k, 2 * uint64_t(l), checkpoint(dir, "mlp", l));
        if (!m) return m.error();
        row[0] = k, row[1] = m->recall, row[2] = m->precision, row[3] = m->loss, row[4] = m->epoch;
      }
      if (sparse_heads(l)) {  // labels: the top head_label_fraction of the heads by output L2 norm
        if (auto st = features(std::max(l - 1, 0), x); !st) return st;
        const int32_t n_pos = count_of(o_.head_label_fraction, s.n_heads);
        labels.assign(size_t(rows) * size_t(s.n_heads), 0);
        std::vector<float> norms(size_t(s.n_heads));
        for (int64_t r0 = 0; r0 < rows; r0 += kChunk) {
          const int64_t n = std::min(kChunk, rows - r0);
          if (auto st = store->read(kTapAttentionOut, l, r0, n, chunk); !st) return st;
          for (int64_t r = 0; r < n; ++r) {
            for (int32_t h = 0; h < s.n_heads; ++h) {
              double ss = 0;
              for (int32_t i = 0; i < s.head_dim; ++i) {
                const double v = chunk[size_t(r * hw + h * s.head_dim + i)];
                ss += v * v;
              }
              norms[size_t(h)] = float(std::sqrt(ss));
            }
            top_k(norms.data(), s.n_heads, n_pos, order);
            for (int32_t i = 0; i < n_pos; ++i) labels[size_t((r0 + r) * s.n_heads + order[size_t(i)])] = 1;
          }
        }
        const int32_t k = count_of(head_keep(l), s.n_heads);
        auto m = fit(x, s.n_embd, labels, s.n_heads, k, 2 * uint64_t(l) + 1, checkpoint(dir, "attn", l));
        if (!m) return m.error();
        row[5] = k, row[6] = m->recall, row[7] = m->precision, row[8] = m->epoch;
      }
    }
    return write_layer_table((fs::path(dir) / kMetricsFile).string(), kColumns, table);
  }

  Status on_load(const LoadContext& ctx) override {
    shape_ = ctx.shape;
    predictors_ = {};
    if (o_.oracle) return ok_status();
    // The trained heads, as the engine runs them.
    auto as_predictor = [&](train::LowRankHead& h, int32_t keep) {
      LowRankPredictor p;
      p.keep = keep;
      p.rank = int32_t(h.options().rank);
      p.relu = h.options().relu;
      p.w1 = std::move(h.w1());
      p.w2 = std::move(h.w2());
      p.b2 = std::move(h.b2());
      return p;
    };
    for (int32_t l = 0; l < shape_.n_layers; ++l) {
      if (sparse_neurons(l)) {
        auto h = train::load(checkpoint(ctx.artifact_dir, "mlp", l), head_options(shape_.n_ff));
        if (!h) return h.error();
        predictors_.neurons.resize(size_t(shape_.n_layers));
        predictors_.neurons[size_t(l)] = as_predictor(*h, count_of(neuron_keep(l), shape_.n_ff));
      }
      if (sparse_heads(l)) {
        auto h = train::load(checkpoint(ctx.artifact_dir, "attn", l), head_options(shape_.n_heads));
        if (!h) return h.error();
        predictors_.heads.resize(size_t(shape_.n_layers));
        predictors_.heads[size_t(l)] = as_predictor(*h, count_of(head_keep(l), shape_.n_heads));
      }
    }
    predictors_.norm_eps = kNormEps;
    // The predictors' validation metrics go with every run's counters (so into the results database).
    training_.clear();
    if (!any_sparse(shape_)) return ok_status();
    auto metrics = read_layer_table((fs::path(ctx.artifact_dir) / kMetricsFile).string(), kColumns, shape_.n_layers);
    if (!metrics) return metrics.error();
    double neuron_recall = 0, head_recall = 0;
    int32_t neuron_layers = 0, head_layers = 0;
    for (int32_t l = 0; l < shape_.n_layers; ++l) {
      const auto& row = (*metrics)[size_t(l)];  // neuron_k, neuron_recall, ..., head_k, head_recall, ...
      if (row[1] >= 0) {
        training_[fmt_layer("train_neuron_recall", l)] = row[1];
        neuron_recall += row[1];
        ++neuron_layers;
      }
      if (row[6] >= 0) {
        training_[fmt_layer("train_head_recall", l)] = row[6];
        head_recall += row[6];
        ++head_layers;
      }
    }
    if (neuron_layers > 0) training_["train_neuron_recall_mean"] = neuron_recall / neuron_layers;
    if (head_layers > 0) training_["train_head_recall_mean"] = head_recall / head_layers;
    return ok_status();
  }

  ComponentPredictors component_predictors() const override { return predictors_; }
  // The predictors choose through the engine; only the oracle masks.
  uint32_t unused_hooks() const override { return o_.oracle ? 0u : uint32_t(kHookComponentMask); }

  bool mask_components(const StepInfo& step, int32_t layer, std::span<const float> hidden,
                       ComponentMask& mask) override {
    (void)step;
    (void)hidden;
    if (!o_.oracle || layer < 0 || layer >= shape_.n_layers) return false;
    const int32_t k = count_of(neuron_keep(layer), shape_.n_ff), kh = count_of(head_keep(layer), shape_.n_heads);
    if (sparse_neurons(layer) && k < shape_.n_ff) mask.oracle_neurons = k;
    if (sparse_heads(layer) && kh < shape_.n_heads) mask.oracle_heads = kh;
    oracle_calls_ += (mask.oracle_neurons > 0 || mask.oracle_heads > 0) ? 1 : 0;
    return mask.oracle_neurons > 0 || mask.oracle_heads > 0;
  }

  // What was skipped is the engine's to count (neurons_skipped, heads_skipped,
  // kv_heads_skipped); these are the predictors' validation metrics.
  std::map<std::string, double> counters() const override {
    if (o_.oracle) return {{"oracle_layer_calls", double(oracle_calls_)}};
    return training_;
  }

 private:
  double neuron_keep(int32_t l) const { return o_.layer_neuron_keep.at(l, o_.neuron_keep); }
  double head_keep(int32_t l) const { return o_.layer_head_keep.at(l, o_.head_keep); }
  static std::string fmt_layer(const char* name, int32_t l) {
    char buf[64];
    std::snprintf(buf, sizeof(buf), "%s.layer%02d", name, l);
    return buf;
  }
  bool sparse_neurons(int32_t l) const { return l >= o_.dense_layers && neuron_keep(l) < 1.0; }
  bool sparse_heads(int32_t l) const { return l >= o_.dense_layers && head_keep(l) < 1.0; }
  bool any_sparse(const ModelShape& shape) const {
    for (int32_t l = 0; l < shape.n_layers; ++l)
      if (sparse_neurons(l) || sparse_heads(l)) return true;
    return false;
  }
  train::HeadOptions head_options(int32_t out) const { return {shape_.n_embd, o_.rank, out, false, true}; }

  struct Fit {
    double recall = 0, precision = 0, loss = 0;
    int32_t epoch = 0;
  };
  // Trains one predictor on (x, labels) and saves it; its validation metrics at the best epoch.
  Result<Fit> fit(const std::vector<float>& x, int64_t dim, const std::vector<uint8_t>& labels, int32_t out,
                  int32_t k, uint64_t salt, const std::string& path) const {
    auto head = train::LowRankHead::create(head_options(out), o_.seed * 1000003u + salt);
    if (!head) return head.error();
    train::TrainOptions t;
    t.max_epochs = o_.epochs;
    t.patience = 3;
    t.validation_fraction = 0.1;
    t.top_k = k;
    t.seed = o_.seed * 1000003u + salt;
    auto report = train::train(*head, train::Dataset{x, dim, labels, {}}, t);
    if (!report) return report.error();
    if (auto st = train::save(*head, path); !st) return st.error();
    const auto& best = report->epochs[size_t(report->best_epoch)].validation;
    return Fit{best.recall, best.precision, best.loss, report->best_epoch};
  }

  std::map<std::string, double> training_;  // validation metrics of the loaded predictors
  Options o_;
  ModelShape shape_;
  ComponentPredictors predictors_;  // the loaded heads, by layer (predictor mode)
  int64_t oracle_calls_ = 0;
};

class DejaVuPlugin final : public Plugin {
 public:
  PluginInfo info() const override {
    std::vector<ParamSpec> params = {ParamSpec::string("mode", "predictor", {"predictor", "oracle"},
                               "predictor: trained predictors choose; oracle: the layer's own dense values choose"),
             ParamSpec::real("neuron_keep", 0.25, 0.001, 1.0, "fraction of FFN neurons computed per layer"),
             ParamSpec::schedule("layer_neuron_keep", "", 0.001, 1.0,
                                 "per-layer neuron_keep (e.g. \"0-3=1; 4-29=0.25\"); layers it names override it"),
             ParamSpec::real("head_keep", 1.0, 0.001, 1.0, "fraction of query heads computed per layer (1: dense)"),
             ParamSpec::schedule("layer_head_keep", "", 0.001, 1.0, "per-layer head_keep; overrides it where named"),
             ParamSpec::dense_layers(0),
             ParamSpec::integer("rank", 128, 0, 65536,
                                "predictor hidden width (0: one linear layer); the reference's 1000 costs about "
                                "what SmolLM2's FFN does"),
             ParamSpec::real("label_fraction", 0.25, 0.001, 1.0,
                             "neurons labelled positive per token: the top fraction by |silu(gate) * up|"),
             ParamSpec::real("head_label_fraction", 0.5, 0.001, 1.0,
                             "heads labelled positive per token: the top fraction by output L2 norm"),
             ParamSpec::integer("epochs", 20, 1, 1000, "most training epochs per predictor (early stopping: 3)"),
             ParamSpec::integer("seed", 0, 0, std::nullopt, "initialisation, split and shuffle seed")};
    for (ParamSpec& spec : ParamSpec::calibration(64, 256)) params.push_back(std::move(spec));
    return {"dejavu", "1.0.0",
            "contextual sparsity: predicted FFN neurons and attention heads per token (Liu et al. 2023)",
            hooks_of<DejaVu>(), std::move(params)};
  }
  Result<std::unique_ptr<Method>> create(const ParamValues& p) const override {
    Options o;
    o.oracle = p.get_string("mode") == "oracle";
    o.neuron_keep = p.get_float("neuron_keep");
    o.layer_neuron_keep = p.get_schedule("layer_neuron_keep");
    o.head_keep = p.get_float("head_keep");
    o.layer_head_keep = p.get_schedule("layer_head_keep");
    o.dense_layers = int32_t(std::min<int64_t>(p.get_int("dense_layers"), std::numeric_limits<int32_t>::max()));
    o.rank = int32_t(p.get_int("rank"));
    o.label_fraction = p.get_float("label_fraction");
    o.head_label_fraction = p.get_float("head_label_fraction");
    o.calibration = calibration_request(p, kTapHiddenIn | kTapFfnActivation | kTapAttentionOut);
    o.calibration.stored = true;
    o.epochs = int32_t(p.get_int("epochs"));
    o.seed = uint64_t(p.get_int("seed"));
    return std::unique_ptr<Method>(std::make_unique<DejaVu>(std::move(o)));
  }
};

}  // namespace

INFERLAB_PLUGIN(DejaVuPlugin)
