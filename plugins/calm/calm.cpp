// CALM (Schuster et al., NeurIPS 2022, "Confident Adaptive Language
// Modeling"): a generated token leaves the model after the first checked layer
// whose confidence in its prediction exceeds a threshold that decays with the
// token's position in the output,
//   lambda(t) = 0.9 lambda + 0.1 lambda exp(-tau t / N)
// (t: generated index from 0, N: decay_tokens). The layers above are skipped;
// their K/V for this token are projected from the exit hidden state (state
// propagation, SkippedLayerKv::FromHidden), so later tokens attend to it.
//
// The engine computes the confidence (ExitPolicy) where the activations live:
//   softmax     top-1 minus top-2 probability of the intermediate prediction
//               (output norm + LM head over the exit state: an LM head per check)
//   state       cos(h_in, h_out) of the checked layer (hidden-state saturation)
//   classifier  a trained 2-way linear classifier's probability that the
//               intermediate prediction agrees with the full model's
// The plugin only chooses: which layers are checked (first_exit, interval),
// the measure, the threshold per position, and the trained weights.
//
// Exit heads (exit_heads = true) make exiting meaningful on a model that was
// not trained for it: per checked layer an affine map from that layer's
// hidden state (over its RMS) to the last layer's (a "tuned lens"), fitted by
// closed-form ridge regression on captured activations; the engine applies it
// before the output norm and head, for the softmax measure and for the logits
// of an exit. The classifier is trained with the shared trainer (softmax
// cross-entropy, AdamW), its label being whether that layer's prediction
// (through the exit head, when there is one) equals the final layer's.
//
// A threshold certified by Learn-then-Test (`inferlab calibrate` writes it)
// comes in through `lambda_file` and replaces `lambda`.
#include <algorithm>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>

#include "inferlab/activations.h"
#include "inferlab/plugin_export.h"
#include "inferlab/prompt_end.h"
#include "inferlab/train.h"

namespace {

using namespace inferlab;
namespace fs = std::filesystem;

constexpr float kNormEps = 1e-5f;  // exit heads and classifiers read h / sqrt(mean(h^2) + eps)
constexpr double kRidge = 1e-3;    // per row: the heads' ridge (the features have unit RMS)
constexpr const char* kLayerTable = "exit_layers.tsv";

struct Options {
  ExitMeasure measure = ExitMeasure::Softmax;
  double lambda = 0.9;
  double tau = 4.0;
  int32_t decay_tokens = 64;
  int32_t first_exit = 1;  // layers every token runs before the first check
  int32_t interval = 1;
  bool exit_heads = false;
  std::string lambda_file;
  CalibrationRequest calibration;
  int32_t epochs = 20;
  uint64_t seed = 0;
};

std::string layer_file(const std::string& dir, const char* what, int32_t layer) {
  char name[64];
  std::snprintf(name, sizeof(name), "%s.%03d.bin", what, layer);
  return (fs::path(dir) / name).string();
}

// A certified threshold file: "key value" lines, `lambda` among them.
Result<double> read_lambda_file(const std::string& path) {
  std::ifstream in(path);
  if (!in) return Error{"calm: lambda_file " + path + " cannot be read"};
  std::string line;
  int line_no = 0;
  while (std::getline(in, line)) {
    ++line_no;
    std::istringstream fields(line);
    std::string key;
    double value = 0;
    if (!(fields >> key) || key != "lambda") continue;
    if (!(fields >> value) || !(value > 0.0 && value <= 1.0))
      return Error{"calm: " + path + ":" + std::to_string(line_no) + ": lambda must be a number in (0, 1]"};
    return value;
  }
  return Error{"calm: " + path + " has no `lambda` line"};
}

class Calm final : public Method {
 public:
  explicit Calm(Options o) : o_(std::move(o)) {}

  bool trains() const { return o_.exit_heads || o_.measure == ExitMeasure::Classifier; }

  // The layers checked: after first_exit layers, then every interval, never the last.
  std::vector<uint8_t> checked(int32_t n_layers) const {
    std::vector<uint8_t> check(size_t(n_layers), 0);
    for (int32_t l = o_.first_exit - 1; l < n_layers - 1; l += o_.interval) check[size_t(l)] = 1;
    return check;
  }

  Status check_layers(const ModelShape& shape) const {
    if (o_.first_exit >= shape.n_layers)
      return Error{"calm: first_exit = " + std::to_string(o_.first_exit) + " leaves no layer to skip in a model of " +
                   std::to_string(shape.n_layers) + " layers (at most " + std::to_string(shape.n_layers - 1) + ")"};
    return ok_status();
  }

  CalibrationRequest calibration(const ModelShape& shape) override {
    shape_ = shape;
    if (!trains() || !check_layers(shape)) return {};  // a bad first_exit is refused by on_load
    return o_.calibration;
  }

  Status finish_stored_calibration(const std::string& store_dir, const std::string& dir, LayerProbe& probe) override {
    auto store = ActivationStore::open(store_dir);
    if (!store) return store.error();
    const ModelShape& s = shape_;
    const int64_t d = s.n_embd, rows = store->rows();
    if (store->width(kTapHiddenOut) != d || store->n_layers() != s.n_layers)
      return Error{store_dir + ": the activation store does not hold hidden_out of this model's shape"};
    // The full model's prediction, and its last hidden state over its RMS (the heads' target).
    std::vector<float> last, h;
    if (auto st = store->read(kTapHiddenOut, s.n_layers - 1, 0, rows, last); !st) return st;
    std::vector<int32_t> final_top1, top1;
    std::vector<float> margin;
    if (auto st = probe.predict(last, nullptr, kNormEps, final_top1, margin); !st) return st;
    train::rms_scale_rows(last, d, kNormEps);
    std::ofstream table(fs::path(dir) / kLayerTable);
    table << "layer\tagreement\tagreement_head\tclassifier_accuracy\n";
    const std::vector<uint8_t> check = checked(s.n_layers);
    for (int32_t l = 0; l < s.n_layers - 1; ++l) {
      if (check[size_t(l)] == 0) continue;
      if (auto st = store->read(kTapHiddenOut, l, 0, rows, h); !st) return st;
      auto agreement = [&](const ExitMap* head, std::vector<int32_t>& predicted) -> Result<double> {
        if (auto st = probe.predict(h, head, kNormEps, predicted, margin); !st) return st.error();
        int64_t same = 0;
        for (int64_t r = 0; r < rows; ++r) same += predicted[size_t(r)] == final_top1[size_t(r)];
        return double(same) / double(rows);
      };
      auto plain = agreement(nullptr, top1);  // top1: the raw state's predictions
      if (!plain) return plain.error();
      std::vector<float> x = h;
      train::rms_scale_rows(x, d, kNormEps);
      ExitMap head;
      double mapped = -1;
      if (o_.exit_heads) {
        if (auto st = train::ridge_regression(x, last, d, d, kRidge, head.weight, head.bias); !st)
          return Error{"calm: exit head of layer " + std::to_string(l) + ": " + st.message()};
        auto fitted = train::LowRankHead::from_parameters({d, 0, d, false, true}, {}, head.weight, head.bias);
        if (!fitted) return fitted.error();
        if (auto st = train::save(*fitted, layer_file(dir, "head", l)); !st) return st;
        auto a = agreement(&head, top1);  // top1: the mapped state's predictions from here on
        if (!a) return a.error();
        mapped = *a;
      }
      double accuracy = -1;
      if (o_.measure == ExitMeasure::Classifier) {
        std::vector<int32_t> classes(static_cast<size_t>(rows));
        for (int64_t r = 0; r < rows; ++r) classes[size_t(r)] = top1[size_t(r)] == final_top1[size_t(r)] ? 1 : 0;
        auto classifier = train::LowRankHead::create({d, 0, 2, false, true}, o_.seed + uint64_t(l));
        if (!classifier) return classifier.error();
        train::TrainOptions t;
        t.loss = train::LossKind::kSoftmaxCrossEntropy;
        t.max_epochs = o_.epochs;
        t.seed = o_.seed + uint64_t(l);
        train::Dataset data{x, d, {}, classes};
        auto report = train::train(*classifier, data, t);
        if (!report) return Error{"calm: classifier of layer " + std::to_string(l) + ": " + report.message()};
        const auto& best = report->epochs[size_t(report->best_epoch)];
        accuracy = best.validation.recall;  // top-1 accuracy for cross-entropy
        if (auto st = train::save(*classifier, layer_file(dir, "classifier", l)); !st) return st;
      }
      table << l << '\t' << *plain << '\t' << mapped << '\t' << accuracy << '\n';
    }
    table.close();
    if (!table) return Error{"calm: cannot write " + (fs::path(dir) / kLayerTable).string()};
    return ok_status();
  }

  Status on_load(const LoadContext& ctx) override {
    shape_ = ctx.shape;
    if (auto st = check_layers(ctx.shape); !st) return st;
    lambda_ = o_.lambda;
    if (!o_.lambda_file.empty()) {
      auto certified = read_lambda_file(o_.lambda_file);
      if (!certified) return certified.error();
      lambda_ = *certified;
    }
    policy_ = ExitPolicy{};
    policy_.measure = o_.measure;
    policy_.check = checked(ctx.shape.n_layers);
    policy_.norm_eps = kNormEps;
    policy_.kv_fill = SkippedLayerKv::FromHidden;
    agreement_.clear();
    if (!trains()) return ok_status();
    const int64_t d = ctx.shape.n_embd;
    const auto L = size_t(ctx.shape.n_layers);
    for (int32_t l = 0; l < ctx.shape.n_layers; ++l) {
      if (policy_.check[size_t(l)] == 0) continue;
      auto take = [&](const char* what, int64_t out, std::vector<ExitMap>& into) -> Status {
        auto h = train::load(layer_file(ctx.artifact_dir, what, l), {d, 0, out, false, true});
        if (!h) return h.error();
        into.resize(L);
        into[size_t(l)].weight = std::move(h->w2());
        into[size_t(l)].bias = std::move(h->b2());
        return ok_status();
      };
      if (o_.exit_heads)
        if (auto st = take("head", d, policy_.heads); !st) return st;
      if (o_.measure == ExitMeasure::Classifier)
        if (auto st = take("classifier", 2, policy_.classifiers); !st) return st;
    }
    // What calibration measured per checked layer goes with every run's counters.
    std::ifstream table(fs::path(ctx.artifact_dir) / kLayerTable);
    std::string line;
    std::getline(table, line);  // header
    while (std::getline(table, line)) {
      std::istringstream f(line);
      int32_t l = -1;
      double plain = 0, mapped = 0, accuracy = 0;
      if (!(f >> l >> plain >> mapped >> accuracy) || l < 0 || l >= ctx.shape.n_layers)
        return Error{"calm: " + (fs::path(ctx.artifact_dir) / kLayerTable).string() + ": malformed line: " + line};
      agreement_.push_back({l, plain, mapped, accuracy});
    }
    return ok_status();
  }

  std::unique_ptr<SequenceState> new_sequence_state(const ModelShape&) override {
    return std::make_unique<PromptEnd>();
  }

  ExitPolicy exit_policy() const override { return policy_; }

  // lambda(t) for decode steps; prompts (multi-token calls) never exit.
  double exit_threshold(const StepInfo& step) override {
    const std::optional<int64_t> g = PromptEnd::generated(step);
    if (!g) return 2.0;
    const double t = double(std::max<int64_t>(0, *g));
    last_threshold_ = 0.9 * lambda_ + 0.1 * lambda_ * std::exp(-o_.tau * t / double(o_.decay_tokens));
    ++decode_tokens_;
    return last_threshold_;
  }

  std::map<std::string, double> counters() const override {
    std::map<std::string, double> out = {{"lambda", lambda_},
                                         {"last_threshold", last_threshold_},
                                         {"decode_tokens", double(decode_tokens_)},
                                         {"checked_layers", double(std::count(policy_.check.begin(),
                                                                              policy_.check.end(), uint8_t{1}))}};
    for (const LayerCalibration& a : agreement_) {
      char key[64];
      std::snprintf(key, sizeof(key), "calibration_agreement.layer%02d", a.layer);
      out[key] = a.plain;
      if (a.mapped >= 0) {
        std::snprintf(key, sizeof(key), "calibration_agreement_head.layer%02d", a.layer);
        out[key] = a.mapped;
      }
      if (a.accuracy >= 0) {
        std::snprintf(key, sizeof(key), "classifier_accuracy.layer%02d", a.layer);
        out[key] = a.accuracy;
      }
    }
    return out;
  }

 private:
  struct LayerCalibration {
    int32_t layer;
    double plain, mapped, accuracy;  // < 0: not measured
  };
  Options o_;
  ModelShape shape_;
  ExitPolicy policy_;
  double lambda_ = 0.9, last_threshold_ = 0;
  int64_t decode_tokens_ = 0;
  std::vector<LayerCalibration> agreement_;
};

class CalmPlugin final : public Plugin {
 public:
  PluginInfo info() const override {
    std::vector<ParamSpec> params = {
        ParamSpec::string("measure", "softmax", {"softmax", "state", "classifier"},
                          "confidence: softmax top-1 minus top-2, hidden-state cosine, or a trained classifier"),
        ParamSpec::real("lambda", 0.9, 0.0, 1.0, "confidence threshold in (0, 1]; 1 with tau 0 never exits")
            .run_time(),
        ParamSpec::real("tau", 4.0, 0.0, 1e6, "decay of the threshold with the generated position").run_time(),
        ParamSpec::integer("decay_tokens", 64, 1, 1 << 24, "N of the decay: the generation length it spans")
            .run_time(),
        ParamSpec::integer("first_exit", 1, 1, 1 << 16, "layers every token runs before the first check"),
        ParamSpec::integer("interval", 1, 1, 1 << 16, "layers between two checks"),
        ParamSpec::boolean("exit_heads", false, "fit an affine exit head (tuned lens) per checked layer"),
        ParamSpec::path("lambda_file", "a certified threshold (`inferlab calibrate` LTT); replaces lambda")
            .run_time(),
        ParamSpec::integer("epochs", 20, 1, 1000, "most classifier training epochs (early stopping: 3)"),
        ParamSpec::integer("seed", 0, 0, std::nullopt, "classifier initialisation, split and shuffle seed")};
    for (ParamSpec& spec : ParamSpec::calibration(32, 128)) params.push_back(std::move(spec));
    return {"calm", "1.0.0",
            "confidence-based early exit with state propagation, exit heads and LTT thresholds (Schuster et al. 2022)",
            hooks_of<Calm>(), std::move(params)};
  }
  Result<std::unique_ptr<Method>> create(const ParamValues& p) const override {
    Options o;
    const std::string& measure = p.get_string("measure");
    o.measure = measure == "state" ? ExitMeasure::State
                : measure == "classifier" ? ExitMeasure::Classifier
                                          : ExitMeasure::Softmax;
    o.lambda = p.get_float("lambda");
    if (!(o.lambda > 0.0))
      return Error{"calm: lambda = " + std::to_string(o.lambda) + " is outside (0, 1]: a threshold of 0 exits always"};
    o.tau = p.get_float("tau");
    o.decay_tokens = int32_t(p.get_int("decay_tokens"));
    o.first_exit = int32_t(p.get_int("first_exit"));
    o.interval = int32_t(p.get_int("interval"));
    o.exit_heads = p.get_bool("exit_heads");
    o.lambda_file = p.get_string("lambda_file");  // a Path parameter: its text, "" for none
    o.calibration = calibration_request(p, kTapHiddenOut);
    o.calibration.stored = true;
    o.epochs = int32_t(p.get_int("epochs"));
    o.seed = uint64_t(p.get_int("seed"));
    return std::unique_ptr<Method>(std::make_unique<Calm>(std::move(o)));
  }
};

}  // namespace

INFERLAB_PLUGIN(CalmPlugin)
