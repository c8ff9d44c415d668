// Which plugin hook a run is in, for the reports of runs that fail: a Method
// that forwards every call to the plugin's method and names the hook under
// way in the process's WorkerState (experiment/worker.h), where the parent
// reads it after the worker died, however it died. A hook an exception left
// is kept too, for the run's error.
#pragma once

#include "inferlab/plugin.h"

namespace inferlab {

struct WorkerState;

// Every call a host makes into a Method; the index is what WorkerState holds.
enum class HookCall : int32_t {
  on_load, calibration, on_calibration, finish_calibration, finish_stored_calibration, begin_sequence, new_sequence_state,
  prefill_pattern, select_kv, page_budget, on_attention, evict, plan_layers, exit_after_layer,
  mask_components, retention_budget, retention_policy, bound_scope, kv_page_format, kv_positions,
  dense_prefill, value_pruning, kv_quantization, activation_sparsity, component_predictors, unused_hooks, counters,
  exit_threshold, exit_policy, speculation,
};
// Its name ("evict"); nullptr for an index that names no call (-1: none under way).
const char* hook_call_name(int32_t call);

class TrackedMethod final : public Method {
 public:
  TrackedMethod(Method& inner, WorkerState& state) : inner_(inner), state_(state) {}

  // The hook the last exception out of the plugin came from (nullptr: none).
  const char* threw_in() const { return hook_call_name(threw_in_); }

  Status on_load(const LoadContext& context) override;
  CalibrationRequest calibration(const ModelShape& shape) override;
  void on_calibration(const CalibrationTaps& taps) override;
  Status finish_calibration(const std::string& artifact_dir) override;
  Status finish_stored_calibration(const std::string& activation_dir, const std::string& artifact_dir,
                                   LayerProbe& probe) override;
  void begin_sequence(const ModelShape& shape) override;
  std::unique_ptr<SequenceState> new_sequence_state(const ModelShape& shape) override;
  bool prefill_pattern(const StepInfo& step, int32_t layer, int32_t head, PrefillPattern& pattern) override;
  bool select_kv(const StepInfo& step, const KvView& kv, int32_t layer, int32_t kv_head,
                 std::span<const float> queries, KvSelection& selection) override;
  int32_t page_budget(const StepInfo& step, const KvView& kv, int32_t layer, int32_t kv_head) override;
  void on_attention(const StepInfo& step, const KvView& kv, const AttentionStats& stats) override;
  void evict(const StepInfo& step, const KvView& kv, int32_t layer, int32_t kv_head,
             std::vector<int32_t>& drop) override;
  bool plan_layers(const StepInfo& step, LayerPlan& plan) override;
  bool exit_after_layer(const StepInfo& step, int32_t layer, std::span<const float> hidden) override;
  double exit_threshold(const StepInfo& step) override;
  bool mask_components(const StepInfo& step, int32_t layer, std::span<const float> hidden,
                       ComponentMask& mask) override;
  RetentionBudget retention_budget(const StepInfo& step, int32_t layer, int32_t kv_head) override;
  RetentionPolicy retention_policy() const override;
  BoundScope bound_scope() const override;
  KvPageFormat kv_page_format() const override;
  KvPositions kv_positions() const override;
  bool dense_prefill() const override;
  ValuePruning value_pruning() const override;
  KvQuantization kv_quantization() const override;
  ActivationSparsity activation_sparsity() const override;
  ComponentPredictors component_predictors() const override;
  ExitPolicy exit_policy() const override;
  Speculation speculation() const override;
  uint32_t unused_hooks() const override;
  std::map<std::string, double> counters() const override;

 private:
  class Scope;
  Method& inner_;
  WorkerState& state_;
  mutable int32_t threw_in_ = -1;  // a HookCall
};

// A hook added to Method must be forwarded here, or runs would silently get
// its default: every hook bit has to be read off an override.
static_assert(hooks_of<TrackedMethod>() == kAllHooks, "TrackedMethod must forward every Method hook");

}  // namespace inferlab
