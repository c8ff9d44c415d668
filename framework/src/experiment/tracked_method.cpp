#include "experiment/tracked_method.h"

#include <exception>
#include <iterator>

#include "experiment/worker.h"

namespace inferlab {

const char* hook_call_name(int32_t call) {
  static const char* const names[] = {
      "on_load",          "calibration",      "on_calibration", "finish_calibration",
      "finish_stored_calibration",              "begin_sequence",
      "new_sequence_state", "prefill_pattern", "select_kv",     "page_budget",        "on_attention",
      "evict",            "plan_layers",      "exit_after_layer", "mask_components",  "retention_budget",
      "retention_policy", "bound_scope",      "kv_page_format", "kv_positions",       "dense_prefill",
      "value_pruning",    "kv_quantization",  "activation_sparsity", "component_predictors", "unused_hooks", "counters",
      "exit_threshold",   "exit_policy",        "speculation"};
  static_assert(std::size(names) == size_t(HookCall::speculation) + 1, "a name for every HookCall");
  return call >= 0 && size_t(call) < std::size(names) ? names[call] : nullptr;
}

// Names the hook in the shared state while the plugin runs it; one that an
// exception leaves is kept in threw_in_. An exception that ends the process
// (std::terminate) unwinds nothing, so the state still names the hook then.
class TrackedMethod::Scope {
 public:
  Scope(const TrackedMethod& method, HookCall call)
      : method_(method),
        call_(int32_t(call)),
        previous_(method.state_.hook.exchange(call_)),
        exceptions_(std::uncaught_exceptions()) {}
  Scope(const Scope&) = delete;
  Scope& operator=(const Scope&) = delete;
  ~Scope() {
    if (std::uncaught_exceptions() > exceptions_) method_.threw_in_ = call_;
    method_.state_.hook.store(previous_);
  }

 private:
  const TrackedMethod& method_;
  int32_t call_, previous_;
  int exceptions_;
};

Status TrackedMethod::on_load(const LoadContext& context) {
  const Scope scope(*this, HookCall::on_load);
  return inner_.on_load(context);
}

CalibrationRequest TrackedMethod::calibration(const ModelShape& shape) {
  const Scope scope(*this, HookCall::calibration);
  return inner_.calibration(shape);
}

void TrackedMethod::on_calibration(const CalibrationTaps& taps) {
  const Scope scope(*this, HookCall::on_calibration);
  inner_.on_calibration(taps);
}

Status TrackedMethod::finish_calibration(const std::string& artifact_dir) {
  const Scope scope(*this, HookCall::finish_calibration);
  return inner_.finish_calibration(artifact_dir);
}

Status TrackedMethod::finish_stored_calibration(const std::string& activation_dir, const std::string& artifact_dir,
                                                LayerProbe& probe) {
  const Scope scope(*this, HookCall::finish_stored_calibration);
  return inner_.finish_stored_calibration(activation_dir, artifact_dir, probe);
}

void TrackedMethod::begin_sequence(const ModelShape& shape) {
  const Scope scope(*this, HookCall::begin_sequence);
  inner_.begin_sequence(shape);
}

std::unique_ptr<SequenceState> TrackedMethod::new_sequence_state(const ModelShape& shape) {
  const Scope scope(*this, HookCall::new_sequence_state);
  return inner_.new_sequence_state(shape);
}

bool TrackedMethod::prefill_pattern(const StepInfo& step, int32_t layer, int32_t head, PrefillPattern& pattern) {
  const Scope scope(*this, HookCall::prefill_pattern);
  return inner_.prefill_pattern(step, layer, head, pattern);
}

bool TrackedMethod::select_kv(const StepInfo& step, const KvView& kv, int32_t layer, int32_t kv_head,
                              std::span<const float> queries, KvSelection& selection) {
  const Scope scope(*this, HookCall::select_kv);
  return inner_.select_kv(step, kv, layer, kv_head, queries, selection);
}

int32_t TrackedMethod::page_budget(const StepInfo& step, const KvView& kv, int32_t layer, int32_t kv_head) {
  const Scope scope(*this, HookCall::page_budget);
  return inner_.page_budget(step, kv, layer, kv_head);
}

void TrackedMethod::on_attention(const StepInfo& step, const KvView& kv, const AttentionStats& stats) {
  const Scope scope(*this, HookCall::on_attention);
  inner_.on_attention(step, kv, stats);
}

void TrackedMethod::evict(const StepInfo& step, const KvView& kv, int32_t layer, int32_t kv_head,
                          std::vector<int32_t>& drop) {
  const Scope scope(*this, HookCall::evict);
  inner_.evict(step, kv, layer, kv_head, drop);
}

bool TrackedMethod::plan_layers(const StepInfo& step, LayerPlan& plan) {
  const Scope scope(*this, HookCall::plan_layers);
  return inner_.plan_layers(step, plan);
}

bool TrackedMethod::exit_after_layer(const StepInfo& step, int32_t layer, std::span<const float> hidden) {
  const Scope scope(*this, HookCall::exit_after_layer);
  return inner_.exit_after_layer(step, layer, hidden);
}

double TrackedMethod::exit_threshold(const StepInfo& step) {
  const Scope scope(*this, HookCall::exit_threshold);
  return inner_.exit_threshold(step);
}

bool TrackedMethod::mask_components(const StepInfo& step, int32_t layer, std::span<const float> hidden,
                                    ComponentMask& mask) {
  const Scope scope(*this, HookCall::mask_components);
  return inner_.mask_components(step, layer, hidden, mask);
}

RetentionBudget TrackedMethod::retention_budget(const StepInfo& step, int32_t layer, int32_t kv_head) {
  const Scope scope(*this, HookCall::retention_budget);
  return inner_.retention_budget(step, layer, kv_head);
}

RetentionPolicy TrackedMethod::retention_policy() const {
  const Scope scope(*this, HookCall::retention_policy);
  return inner_.retention_policy();
}

BoundScope TrackedMethod::bound_scope() const {
  const Scope scope(*this, HookCall::bound_scope);
  return inner_.bound_scope();
}

KvPageFormat TrackedMethod::kv_page_format() const {
  const Scope scope(*this, HookCall::kv_page_format);
  return inner_.kv_page_format();
}

KvPositions TrackedMethod::kv_positions() const {
  const Scope scope(*this, HookCall::kv_positions);
  return inner_.kv_positions();
}

bool TrackedMethod::dense_prefill() const {
  const Scope scope(*this, HookCall::dense_prefill);
  return inner_.dense_prefill();
}

ValuePruning TrackedMethod::value_pruning() const {
  const Scope scope(*this, HookCall::value_pruning);
  return inner_.value_pruning();
}

KvQuantization TrackedMethod::kv_quantization() const {
  const Scope scope(*this, HookCall::kv_quantization);
  return inner_.kv_quantization();
}

ActivationSparsity TrackedMethod::activation_sparsity() const {
  const Scope scope(*this, HookCall::activation_sparsity);
  return inner_.activation_sparsity();
}

ComponentPredictors TrackedMethod::component_predictors() const {
  const Scope scope(*this, HookCall::component_predictors);
  return inner_.component_predictors();
}

ExitPolicy TrackedMethod::exit_policy() const {
  const Scope scope(*this, HookCall::exit_policy);
  return inner_.exit_policy();
}

Speculation TrackedMethod::speculation() const {
  const Scope scope(*this, HookCall::speculation);
  return inner_.speculation();
}

uint32_t TrackedMethod::unused_hooks() const {
  const Scope scope(*this, HookCall::unused_hooks);
  return inner_.unused_hooks();
}

std::map<std::string, double> TrackedMethod::counters() const {
  const Scope scope(*this, HookCall::counters);
  return inner_.counters();
}

}  // namespace inferlab
