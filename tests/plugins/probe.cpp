// A test plugin that implements every hook with decisions set by parameters,
// and reports what it saw through counters. Engine tests configure it, run the
// engine, and compare against an independent reference that applies the same
// decisions (tests/unit/test_plugin_hooks.cpp).
#include <algorithm>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <set>
#include <sstream>

#include "inferlab/plugin_export.h"

namespace {

using namespace inferlab;

std::vector<int32_t> parse_list(const std::string& text) {
  std::vector<int32_t> out;
  std::stringstream ss(text);
  for (std::string item; std::getline(ss, item, ',');)
    if (!item.empty()) out.push_back(std::stoi(item));
  return out;
}

bool step_matches(int64_t wanted, const StepInfo& step) { return wanted < 0 || wanted == step.step; }

class ProbeMethod final : public Method {
 public:
  explicit ProbeMethod(const ParamValues& p)
      : evict_positions_(parse_list(p.get_string("evict_positions"))),
        evict_step_(p.get_int("evict_step")),
        select_pages_(parse_list(p.get_string("select_pages"))),
        select_tokens_(parse_list(p.get_string("select_tokens"))),
        page_budget_(int32_t(p.get_int("page_budget"))),
        pattern_block_(int32_t(p.get_int("pattern_block"))),
        pattern_window_(int32_t(p.get_int("pattern_window"))),
        skip_layers_(parse_list(p.get_string("skip_layers"))),
        skip_step_(p.get_int("skip_step")),
        kv_fill_none_(p.get_string("kv_fill") == "none"),
        exit_after_(int32_t(p.get_int("exit_after_layer"))),
        exit_step_(p.get_int("exit_step")),
        mask_heads_(parse_list(p.get_string("mask_heads"))),
        neuron_stride_(int32_t(p.get_int("neuron_stride"))),
        write_artifact_(p.get_bool("write_artifact")),
        cache_positions_(p.get_bool("cache_positions")),
        dense_prefill_(p.get_bool("dense_prefill")),
        retain_(RetentionBudget{int32_t(p.get_int("retain_sink")), int32_t(p.get_int("retain_recent")),
                                int32_t(p.get_int("retain_heavy"))}),
        retain_policy_{p.get_string("retain_score") == "last" ? RetentionScore::LastMass
                                                               : RetentionScore::AccumulatedMass,
                       p.get_string("retain_scope") == "sequence" ? RetentionScope::PerSequence
                                                                   : RetentionScope::PerHead},
        kv_pages_(p.get_string("kv_pages")),
        scale_tensor_(p.get_string("scale_tensor")),
        scale_layer_(int32_t(p.get_int("scale_layer"))),
        scale_by_(p.get_float("scale_by")),
        calibrate_samples_(int32_t(p.get_int("calibrate_samples"))),
        calibrate_tokens_(int32_t(p.get_int("calibrate_tokens"))),
        calibrate_corpus_(p.get_string("calibrate_corpus")) {}

  // Calibration: every tap, checked for size; the artifact is the number of
  // samples and the sum of layer 0's input, which on_load reads back.
  CalibrationRequest calibration(const ModelShape& shape) override {
    shape_ = shape;
    const uint32_t all = kTapHiddenIn | kTapQueries | kTapKeys | kTapAttentionOut | kTapFfnActivation | kTapLogits;
    return {calibrate_corpus_, calibrate_samples_, calibrate_tokens_, all};
  }

  void on_calibration(const CalibrationTaps& t) override {
    const auto rows = size_t(t.n_tokens);
    if (t.layer < 0) {
      count("calibration_logits");
      if (t.logits.size() != rows * size_t(shape_.n_vocab)) count("tap_size_wrong");
      return;
    }
    count("calibration_layers");
    const size_t q = size_t(shape_.n_heads * shape_.head_dim), kv = size_t(shape_.n_kv_heads * shape_.head_dim);
    if (t.hidden_in.size() != rows * size_t(shape_.n_embd) || t.queries.size() != rows * q ||
        t.keys.size() != rows * kv || t.attention_out.size() != rows * q ||
        t.ffn_activation.size() != rows * size_t(shape_.n_ff) || t.tokens.size() != rows)
      count("tap_size_wrong");
    if (t.layer == 0)
      for (float x : t.hidden_in) hidden_sum_ += x;
    samples_seen_ = std::max(samples_seen_, t.sample + 1);
  }

  Status finish_calibration(const std::string& dir) override {
    count("calibration_finished");
    std::ofstream out(std::filesystem::path(dir) / "probe-calibration.txt");
    out.precision(17);
    out << samples_seen_ << " " << hidden_sum_ << "\n";
    return out ? ok_status() : Error{"probe: cannot write the calibration file in " + dir};
  }

  bool dense_prefill() const override { return dense_prefill_; }

  KvPageFormat kv_page_format() const override {
    if (kv_pages_ == "f32") return KvPageFormat::F32;
    if (kv_pages_ == "f16") return KvPageFormat::F16;
    if (kv_pages_ == "bf16") return KvPageFormat::BF16;
    return KvPageFormat::Any;
  }

  RetentionPolicy retention_policy() const override { return retain_policy_; }

  RetentionBudget retention_budget(const StepInfo&, int32_t, int32_t) override {
    if (retain_.heavy >= 0) count("retention_budget_calls");
    return retain_;
  }

  KvPositions kv_positions() const override {
    return cache_positions_ ? KvPositions::Cache : KvPositions::Original;
  }

  Status on_load(const LoadContext& ctx) override {
    shape_ = ctx.shape;
    count("load_calls");
    double sum = 0;
    for (float w : ctx.weights->tensor("token_embd", -1)) sum += w;
    counters_["weights_token_embd_sum"] = sum;
    counters_["weights_attn_q_layer0_size"] = double(ctx.weights->tensor("attn_q", 0).size());
    if (!scale_tensor_.empty()) {  // this run's copy of one projection, scaled
      const auto w = ctx.weights->tensor(scale_tensor_, scale_layer_);
      std::vector<float> scaled(w.begin(), w.end());
      for (float& x : scaled) x = float(x * scale_by_);
      if (auto s = ctx.overrides->replace(scale_tensor_, scale_layer_, scaled); !s) return s;
      count("weights_replaced");
    }
    if (calibrate_samples_ > 0) {
      std::ifstream in(std::filesystem::path(ctx.artifact_dir) / "probe-calibration.txt");
      double samples = 0, sum = 0;
      if (!(in >> samples >> sum)) return Error{"probe: no calibration file in " + ctx.artifact_dir};
      counters_["calibration_read_samples"] = samples;
      counters_["calibration_read_hidden_sum"] = sum;
    }
    if (write_artifact_) {
      std::ofstream out(std::filesystem::path(ctx.artifact_dir) / "probe-artifact.txt");
      out << ctx.model_checksum << "\n";
      if (!out) return Error{"probe: cannot write the artifact file in " + ctx.artifact_dir};
      count("artifact_written");
    }
    return ok_status();
  }

  void begin_sequence(const ModelShape& shape) override {
    shape_ = shape;
    count("sequences");
  }

  bool prefill_pattern(const StepInfo&, int32_t, int32_t, PrefillPattern& pattern) override {
    if (pattern_block_ <= 0) return false;
    count("prefill_pattern_calls");
    pattern.block_size = pattern_block_;
    const int32_t blocks = (shape_.context_length + pattern_block_ - 1) / pattern_block_;
    for (int32_t qb = 0; qb < blocks; ++qb) {
      pattern.blocks.emplace_back(qb, 0);  // a sink block, as MInference's A-shape keeps
      for (int32_t kb = std::max(1, qb - pattern_window_ + 1); kb <= qb; ++kb) pattern.blocks.emplace_back(qb, kb);
    }
    return true;
  }

  int32_t page_budget(const StepInfo& step, const KvView&, int32_t, int32_t) override {
    if (page_budget_ == 0) return -1;
    count("page_budget_calls");
    return step.decode() ? page_budget_ : 0;
  }

  bool select_kv(const StepInfo& step, const KvView& kv, int32_t layer, int32_t kv_head, std::span<const float> q,
                 KvSelection& selection) override {
    if (!step.decode() || (select_pages_.empty() && select_tokens_.empty())) return false;
    count("select_calls");
    if (q.size() != size_t(shape_.group_size() * shape_.head_dim)) count("select_query_size_wrong");
    const int32_t cached = kv.n_tokens(layer, kv_head);
    const bool pages = !select_pages_.empty();
    selection.unit = pages ? KvSelection::Unit::Pages : KvSelection::Unit::Tokens;
    const int32_t limit = pages ? (cached + kv.page_size() - 1) / kv.page_size() : cached;
    std::set<int32_t>& chosen = selected_[{layer, kv_head}];
    chosen.clear();
    for (int32_t x : pages ? select_pages_ : select_tokens_) {
      if (x >= limit) continue;
      selection.indices.push_back(x);
      const int32_t first = pages ? x * kv.page_size() : x;
      const int32_t last = pages ? std::min(cached, first + kv.page_size()) : x + 1;
      for (int32_t t = first; t < last; ++t) chosen.insert(t);
    }
    cached_before_[{layer, kv_head}] = cached;
    return true;
  }

  void on_attention(const StepInfo& step, const KvView& kv, const AttentionStats& stats) override {
    count("attention_calls");
    double sum = 0;
    for (float m : stats.key_mass) sum += m;
    counters_["mass_sum"] += sum;
    counters_["mass_expected"] += double(shape_.group_size()) * step.n_tokens;
    if (stats.key_mass.size() != size_t(kv.n_tokens(stats.layer, stats.kv_head))) count("mass_size_wrong");
    for (float norm : stats.head_output_norm) counters_["head_output_norm_sum"] += norm;
    auto it = selected_.find({stats.layer, stats.kv_head});
    if (step.decode() && it != selected_.end()) {
      const int32_t cached = cached_before_[{stats.layer, stats.kv_head}];
      for (int32_t t = 0; t < cached; ++t)
        if (it->second.count(t) == 0) counters_["mass_outside_selection"] += stats.key_mass[size_t(t)];
    }
  }

  void evict(const StepInfo& step, const KvView& kv, int32_t layer, int32_t kv_head,
             std::vector<int32_t>& drop) override {
    if (evict_positions_.empty() || !step_matches(evict_step_, step)) return;
    count("evict_calls");
    const auto positions = kv.positions(layer, kv_head);
    for (int32_t i = 0; i < int32_t(positions.size()); ++i)
      for (int32_t p : evict_positions_)
        if (positions[size_t(i)] == p) drop.push_back(i);
    counters_["tokens_requested_evicted"] += double(drop.size());
  }

  bool plan_layers(const StepInfo& step, LayerPlan& plan) override {
    if (skip_layers_.empty() || !step_matches(skip_step_, step)) return false;
    count("layer_plan_calls");
    for (int32_t l : skip_layers_) plan.run[size_t(l)] = 0;
    plan.kv_fill = kv_fill_none_ ? SkippedLayerKv::None : SkippedLayerKv::FromHidden;
    return true;
  }

  bool exit_after_layer(const StepInfo& step, int32_t layer, std::span<const float> hidden) override {
    if (hidden.size() != size_t(shape_.n_embd)) count("exit_hidden_size_wrong");
    if (exit_after_ < 0 || !step_matches(exit_step_, step) || layer != exit_after_) return false;
    count("early_exits");
    return true;
  }

  // Declared so the probe has every hook; its exit policy is inactive (no exits by confidence).
  double exit_threshold(const StepInfo&) override {
    count("exit_threshold_calls");
    return 2.0;
  }

  bool mask_components(const StepInfo& step, int32_t, std::span<const float> hidden, ComponentMask& mask) override {
    if (mask_heads_.empty() && neuron_stride_ <= 1) return false;
    count("mask_calls");
    if (hidden.size() != size_t(step.n_tokens) * size_t(shape_.n_embd)) count("mask_hidden_size_wrong");
    for (int32_t h : mask_heads_) mask.heads[size_t(h)] = 0;
    if (neuron_stride_ > 1) {
      mask.all_neurons = false;
      for (int32_t j = 0; j < shape_.n_ff; j += neuron_stride_) mask.neurons.push_back(j);
    }
    return true;
  }

  std::map<std::string, double> counters() const override { return counters_; }

 private:
  void count(const std::string& name) { counters_[name] += 1; }

  std::vector<int32_t> evict_positions_;
  int64_t evict_step_;
  std::vector<int32_t> select_pages_, select_tokens_;
  int32_t page_budget_ = 0;
  int32_t pattern_block_, pattern_window_;
  std::vector<int32_t> skip_layers_;
  int64_t skip_step_;
  bool kv_fill_none_;
  int32_t exit_after_;
  int64_t exit_step_;
  std::vector<int32_t> mask_heads_;
  int32_t neuron_stride_;
  bool write_artifact_;
  bool cache_positions_;
  bool dense_prefill_;
  RetentionBudget retain_;
  RetentionPolicy retain_policy_;
  std::string kv_pages_;
  std::string scale_tensor_;
  int32_t scale_layer_;
  double scale_by_;
  int32_t calibrate_samples_, calibrate_tokens_;
  std::string calibrate_corpus_;
  int32_t samples_seen_ = 0;
  double hidden_sum_ = 0;
  ModelShape shape_;
  std::map<std::pair<int32_t, int32_t>, std::set<int32_t>> selected_;
  std::map<std::pair<int32_t, int32_t>, int32_t> cached_before_;
  std::map<std::string, double> counters_;
};

class ProbePlugin final : public Plugin {
 public:
  PluginInfo info() const override {
    return {"probe",
            "1.2.0",
            "test plugin: every hook, decisions set by parameters",
            hooks_of<ProbeMethod>(),
            {
                ParamSpec::string("evict_positions", "", {}, "comma-separated positions to evict"),
                ParamSpec::integer("evict_step", 0, -1, std::nullopt, "forward call that evicts (-1: every call)"),
                ParamSpec::string("select_pages", "", {}, "pages each decode step reads"),
                ParamSpec::string("select_tokens", "", {}, "stored tokens each decode step reads"),
                ParamSpec::integer("page_budget", 0, 0, 1 << 20, "pages each decode step reads, chosen by key bound (0: off)"),
                ParamSpec::integer("pattern_block", 0, 0, 4096, "prefill block size (0: dense prefill)"),
                ParamSpec::integer("pattern_window", 1, 1, 4096, "key blocks before the diagonal, plus block 0"),
                ParamSpec::string("skip_layers", "", {}, "layers the plan skips"),
                ParamSpec::integer("skip_step", -1, -1, std::nullopt, "forward call that skips (-1: all)"),
                ParamSpec::string("kv_fill", "hidden", {"hidden", "none"}, "KV of skipped layers"),
                ParamSpec::integer("exit_after_layer", -1, -1, std::nullopt, "early exit after this layer"),
                ParamSpec::integer("exit_step", -1, -1, std::nullopt, "forward call that exits (-1: all)"),
                ParamSpec::string("mask_heads", "", {}, "query heads not computed"),
                ParamSpec::integer("neuron_stride", 1, 1, 1024, "compute FFN neurons j with j % stride == 0"),
                ParamSpec::boolean("write_artifact", false, "on_load writes a file into the artifact folder"),
                ParamSpec::boolean("cache_positions", false, "RoPE positions are cache indices"),
                ParamSpec::boolean("dense_prefill", false, "declare the prefill dense (allows prefill reuse)"),
                ParamSpec::integer("retain_heavy", -1, -1, 1 << 24, "engine retention: best-scoring tokens kept (-1: off)"),
                ParamSpec::integer("retain_recent", 0, 0, 1 << 24, "engine retention: recent tokens kept"),
                ParamSpec::integer("retain_sink", 0, 0, 1 << 24, "engine retention: first tokens kept"),
                ParamSpec::string("retain_score", "accumulated", {"accumulated", "last"}, "engine retention score"),
                ParamSpec::string("retain_scope", "head", {"head", "sequence"}, "engine retention scope"),
                ParamSpec::string("kv_pages", "any", {"any", "f32", "f16", "bf16"}, "KV page format the method needs"),
                ParamSpec::string("scale_tensor", "", {}, "a projection this run replaces by a scaled copy"),
                ParamSpec::integer("scale_layer", 0, -1, 4096, "its layer (-1: output)"),
                ParamSpec::real("scale_by", 1.0, -16.0, 16.0, "the scale"),
                ParamSpec::integer("calibrate_samples", 0, 0, 64, "calibration samples (0: none)"),
                ParamSpec::integer("calibrate_tokens", 16, 2, 4096, "tokens per calibration sample"),
                ParamSpec::string("calibrate_corpus", "kjv", {}, "calibration corpus: kjv or a text file"),
            }};
  }
  Result<std::unique_ptr<Method>> create(const ParamValues& params) const override {
    return std::unique_ptr<Method>(std::make_unique<ProbeMethod>(params));
  }
};

}  // namespace

INFERLAB_PLUGIN(ProbePlugin)
