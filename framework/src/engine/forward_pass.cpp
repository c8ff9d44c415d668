#include "engine/forward_pass.h"

#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <functional>
#include <array>

namespace inferlab {

ForwardPass::ForwardPass(Backend& backend, const ModelConfig& config, const EngineOptions& options,
                         const MethodCall& method, EngineCounters& counters, KvSequence& seq,
                         std::span<const int32_t> tokens, ForwardObserver* observer)
    : backend_(backend),
      config_(config),
      options_(options),
      method_(method),
      counters_(counters),
      seq_(seq),
      tokens_(tokens),
      step_{seq.forward_calls(), seq.n_past(), int32_t(tokens.size()), seq.id(), method.state},
      observer_(observer) {
  row_ids_.resize(tokens.size());
  for (size_t i = 0; i < row_ids_.size(); ++i) row_ids_[i] = int32_t(i);
}

Status ForwardPass::run(int64_t logits_from, const LogitsSink& sink) {
  if (auto s = plan_step(); !s) return s;
  return run_planned(logits_from, sink);
}

Status ForwardPass::run_planned(int64_t logits_from, const LogitsSink& sink) {
  const int64_t n = int64_t(tokens_.size());
  ++counters_.forward_calls;
  if (step_.decode()) ++counters_.decode_steps;
  if (auto s = backend_.begin_call({tokens_, step_.first_position, method_.cache_positions, {}}); !s) return s;
  logits_from = std::max<int64_t>(logits_from, 0);
  const LogitsSink wanted = logits_from < n && sink ? sink : LogitsSink{};
  if (options_.cuda_graphs && !options_.time_attention && plan_.replayable() && backend_.supports(Feature::Graphs)) {
    auto replayed = try_replay(logits_from == 0 ? wanted : LogitsSink{});
    if (!replayed) return replayed.error();
    if (*replayed) {
      if (logits_from == 0 && wanted) ++counters_.logits_rows;
      if (auto s = collect_sparsity(); !s) return s;
      if (auto s = collect_predicted(); !s) return s;
      double attention_seconds = 0;
      return backend_.end_call(attention_seconds);
    }
  }
  if (auto s = run_layers(); !s) return s;
  finish_call();
  if (auto s = collect_sparsity(); !s) return s;
  if (auto s = collect_predicted(); !s) return s;
  if (wanted) {
    // Rows pruned inside the call have no logits: the rows asked for must all be left.
    const auto first = std::lower_bound(row_ids_.begin(), row_ids_.end(), int32_t(logits_from));
    const int64_t from = first - row_ids_.begin(), count = int64_t(row_ids_.end() - first);
    if (count != n - logits_from) {
      int32_t missing = int32_t(logits_from);
      for (auto it = first; it != row_ids_.end() && *it == missing; ++it) ++missing;
      return Error{fmt::format("method: retention per sequence pruned row {} of this {}-token call before its "
                               "logits; score such a method token by token (one token per call)",
                               missing, n)};
    }
    const LogitsSink mapped = [&](int64_t row, std::span<const float> logits) { wanted(row_ids_[size_t(row)], logits); };
    if (auto s = backend_.logits(from, count, count == n ? wanted : mapped); !s) return s;
    counters_.logits_rows += count;
  }
  double attention_seconds = 0;
  auto s = backend_.end_call(attention_seconds);
  counters_.attention_seconds += attention_seconds;
  return s;
}

Status ForwardPass::run_single_layer(int32_t layer, std::span<const float> input, std::vector<float>& output) {
  if (auto s = plan_step(); !s) return s;
  if (auto s = backend_.begin_call({tokens_, step_.first_position, false, {}}); !s) return s;
  if (auto s = backend_.write_hidden(input); !s) return s;
  if (auto s = run_layer(layer); !s) return s;
  if (auto s = backend_.read_hidden(0, output); !s) return s;
  if (auto s = collect_sparsity(); !s) return s;
  double attention_seconds = 0;
  return backend_.end_call(attention_seconds);
}

void ForwardPass::finish_call() {
  seq_.set_n_past(step_.first_position + step_.n_tokens);
  seq_.count_forward_call();
}

// Everything decided before the first op: which layers run, each head's page
// budget, each head's retention budget, and what the step needs from the host.
Status ForwardPass::plan_step() {
  const int32_t L = config_.n_layers, nkv = config_.n_kv_heads, ps = seq_.pool().shape().page_size;
  plan_.step = step_;
  plan_.bound_per_head = method_.bound_per_head;
  plan_.run.assign(size_t(L), 1);
  if (method_.draft_layers > 0) {  // a draft step: the method's own layer plan does not apply
    for (int32_t l = method_.draft_layers; l < L; ++l) plan_.run[size_t(l)] = 0;
    plan_.kv_fill = SkippedLayerKv::None;
  } else if (method_.has(kHookLayerPlan)) {
    LayerPlan layers;
    layers.run.assign(size_t(L), 1);
    if (method_.method->plan_layers(step_, layers)) {
      if (layers.run.size() != size_t(L))
        return Error{fmt::format("method: layer plan has {} entries, the model has {} layers", layers.run.size(), L)};
      plan_.run = std::move(layers.run);
      plan_.kv_fill = layers.kv_fill;
    }
  }
  // Exit by confidence: one-row decode steps only, and not when the method's
  // threshold rules every exit out (such a step may still be replayed).
  plan_.exit_checks = false;
  plan_.exit_threshold = 2;
  if (method_.exit != nullptr && method_.has(kHookExitConfidence)) {
    plan_.exit_threshold = method_.method->exit_threshold(step_);
    if (std::isnan(plan_.exit_threshold))
      return Error{fmt::format("method: exit threshold NaN at position {}", step_.first_position)};
    plan_.exit_checks = step_.decode() && plan_.exit_threshold <= 1.0 && method_.draft_layers == 0;
  }
  plan_.budgets.assign(size_t(L), std::vector<int32_t>(size_t(nkv), -1));
  plan_.max_keys = 0;
  std::unique_ptr<BackendKvView> view;
  if (method_.has(kHookPageBudget)) view = backend_.kv_view(seq_);
  for (int32_t l = 0; l < L; ++l)
    for (int32_t g = 0; g < nkv; ++g) {
      const int32_t cached = seq_.table(l, g).n_tokens();
      plan_.max_keys = std::max(plan_.max_keys, cached + step_.n_tokens);
      if (!view || plan_.run[size_t(l)] == 0) continue;
      const int32_t budget = method_.method->page_budget(step_, *view, l, g), pages = (cached + ps - 1) / ps;
      plan_.budgets[size_t(l)][size_t(g)] = budget < 0 ? -1 : budget > 0 && budget < pages ? budget : 0;
    }
  plan_.retention.clear();
  if (method_.has(kHookRetention)) {
    plan_.retention.assign(size_t(L), std::vector<RetentionBudget>(size_t(nkv)));
    for (int32_t l = 0; l < L; ++l)
      for (int32_t g = 0; g < nkv && plan_.run[size_t(l)] != 0; ++g)
        plan_.retention[size_t(l)][size_t(g)] = method_.method->retention_budget(step_, l, g);
  }
  bool ask_selection = false;
  for (int32_t l = 0; l < L; ++l)
    for (int32_t b : plan_.budgets[size_t(l)]) ask_selection = ask_selection || b < 0;
  plan_.host_reads = (ask_selection && method_.has(kHookDecodeSelection)) || method_.has(kHookComponentMask) ||
                     method_.has(kHookAttentionFeedback) || (method_.has(kHookLayerExit) && L > 1) ||
                     plan_.exit_checks;  // a confidence comes back after each checked layer
  plan_.host_changes = method_.has(kHookEviction) || method_.has(kHookRetention);
  if (observer_ != nullptr) plan_.host_reads = true;
  if (method_.values.active()) plan_.host_reads = true;  // the kept values come back for the traffic counters
  if (method_.quant.active()) plan_.host_reads = true;   // so do the refetched rows (RequantTally)
  for (int32_t l = 0; l < L; ++l)
    if (window_binds(l)) plan_.host_reads = true;  // a window's key list is made on the host each step
  return ok_status();
}

namespace {

// Captures a step as the graph of `plan`: `layers` (the schedule's layers,
// run in capture mode while `capturing` is on) and the logits of `rows`
// rows. The capture ends whatever happens (an error drops it, an exception
// passes through after it), or the stream would stay in it.
Status capture_step(Backend& backend, const StepPlan& plan, int64_t rows, const std::function<void(bool)>& capturing,
                    const std::function<Status()>& layers) {
  Status body = backend.capture_begin(plan);
  if (!body) return body;
  capturing(true);
  try {
    body = layers();
    if (body) body = backend.logits(0, rows, {});
  } catch (...) {
    capturing(false);
    (void)backend.capture_end(plan, false);
    throw;
  }
  capturing(false);
  auto end = backend.capture_end(plan, body.ok());
  return body ? end : body;
}

}  // namespace

// A decode step that needs nothing from the host between ops: staged for every
// layer at once, captured the first time its plan's shape is seen (the same
// schedule, run in capture mode), then replayed. False: run it eagerly.
Result<bool> ForwardPass::try_replay(const LogitsSink& sink) {
  staged_.assign(size_t(config_.n_layers), KeyPlan{});
  for (int32_t l = 0; l < config_.n_layers; ++l)
    if (plan_.run[size_t(l)] != 0) plan_from_budgets(l, staged_[size_t(l)]);
  // What staging reserved for the new token goes when the step does not happen.
  auto undo = [&](const Status& why) -> Status {
    staged_.clear();
    if (auto s = backend_.truncate(seq_, step_.first_position); !s) return s;
    return why;
  };
  auto ready = backend_.prepare_replay(seq_, plan_, staged_);
  if (!ready) return undo(ready.error()).error();
  if (!*ready) {
    staged_.clear();
    return false;
  }
  if (!backend_.has_graph(plan_)) {
    const Status body = capture_step(
        backend_, plan_, 1, [&](bool on) { capturing_ = on; }, [&] { return run_layers(); });
    if (!body) {  // no graph: the step runs eagerly instead, from the cache as it was
      if (auto s = undo(ok_status()); !s) return s.error();
      return false;
    }
  }
  if (auto s = backend_.replay(plan_, sink); !s) return undo(s).error();
  if (auto s = count_replayed(); !s) return s.error();
  return true;
}

// What the eager schedule counts for a step, counted after its replay.
Status ForwardPass::count_replayed() {
  for (int32_t l = 0; l < config_.n_layers; ++l) {
    if (plan_.run[size_t(l)] == 0) {
      ++counters_.layers_skipped;
      if (plan_.kv_fill == SkippedLayerKv::FromHidden) counters_.kv_fills_propagated += rows();
      continue;
    }
    ++counters_.decode_layers_run;  // a replay is a decode step
    KeyPlan& keys = staged_[size_t(l)];
    if (keys.by_bound_per_head && keys.any_by_bound())  // the union's size: known once selected
      if (auto s = backend_.read_bound_selection(l, keys); !s) return s;
    count_keys(keys, l);
    count_sparse_inputs(l);
  }
  computed_ = plan_.run;
  ++counters_.graph_replays;
  finish_call();
  return ok_status();
}

Status ForwardPass::run_layers() {
  const int32_t L = config_.n_layers;
  if (auto s = backend_.embed(); !s) return s;
  computed_.assign(size_t(L), 0);
  predicted_layer_ = -1;
  bool exited = false;
  int32_t exit_layer = -1;  // where the exit policy's confidence passed the threshold
  const ExitLayout* policy = plan_.exit_checks && rows() == 1 ? method_.exit : nullptr;
  std::vector<float> hidden;
  for (int32_t l = 0; l < L; ++l) {
    if (exited || plan_.run[size_t(l)] == 0) {
      if (auto s = skip_layer(l, exit_layer >= 0 ? policy->kv_fill : plan_.kv_fill); !s) return s;
      continue;
    }
    const bool check = policy != nullptr && policy->checks(l);
    if (check && policy->measure == ExitMeasure::State)
      if (auto s = backend_.keep_exit_state(); !s) return s;
    if (auto s = run_layer(l); !s) return s;
    computed_[size_t(l)] = 1;
    if (step_.decode() && !capturing_) ++counters_.decode_layers_run;
    if (check) {
      auto confidence = backend_.exit_confidence(l);
      if (!confidence) return confidence.error();
      ++counters_.exit_checks;
      if (double(*confidence) > plan_.exit_threshold) {
        exited = true;
        exit_layer = l;
        count_exit(l);
        continue;
      }
    }
    if (method_.has(kHookLayerExit) && l + 1 < L) {  // only a method that exits reads the hidden state
      if (auto s = backend_.read_hidden(rows() - 1, hidden); !s) return s;
      exited = method_.method->exit_after_layer(step_, l, hidden);
      if (exited && !capturing_) count_exit(l);
    }
  }
  // The skipped layers' K/V came from the exit state itself; the logits come
  // from it through the layer's exit head.
  if (exit_layer >= 0 && policy->maps(exit_layer)) return backend_.apply_exit_head(exit_layer);
  return ok_status();
}

// A call (or a batched call's sequence) that ended after layer l.
void ForwardPass::count_exit(int32_t l) {
  counters_.exits_after_layer.resize(size_t(config_.n_layers), 0);
  ++counters_.exits_after_layer[size_t(l)];
}

// The layer is an identity on the residual stream; unless the plan says
// otherwise its cache still gets the K/V of the hidden state that passes it,
// so later tokens can attend to it.
Status ForwardPass::skip_layer(int32_t l, SkippedLayerKv fill) {
  if (!capturing_) ++counters_.layers_skipped;
  if (fill == SkippedLayerKv::None) return ok_status();
  if (!capturing_) counters_.kv_fills_propagated += rows();
  if (auto s = skipped_kv(l); !s) return s;
  return append_skipped_kv(l);
}

// The passing rows' K (rotated) and V into this sequence's cache at layer l
// (in a batched call, with its segment focused).
Status ForwardPass::append_skipped_kv(int32_t l) {
  if (auto s = backend_.rope(seq_, l, false); !s) return s;
  return backend_.append_kv(seq_, l);
}

// K and V of the call's rows as they pass a skipped layer (every row of a batched call).
Status ForwardPass::skipped_kv(int32_t l) {
  if (auto s = backend_.rmsnorm(Norm::Attention, l); !s) return s;
  if (auto s = backend_.linear(Proj::K, l); !s) return s;
  if (auto s = backend_.linear(Proj::V, l); !s) return s;
  if (config_.qkv_bias)
    for (Proj p : {Proj::K, Proj::V})
      if (auto s = backend_.add_bias(p, l); !s) return s;
  return ok_status();
}

// An intermediate for the observer, when it asked for it.
Status ForwardPass::tap(Tap which, uint32_t bit, std::vector<float>& out) {
  if (observer_ == nullptr || (observer_->taps() & bit) == 0) return ok_status();
  return backend_.read_tap(which, out);
}

Status ForwardPass::run_layer(int32_t l) {
  LayerWork w;
  if (auto s = layer_input(l, w); !s) return s;
  if (auto s = layer_attention(l, w); !s) return s;
  return layer_output(l, w);
}

// The layer up to its attention, over every row of the call: the mask and
// predictors, the attention norm, Q, K, V and their biases.
Status ForwardPass::layer_input(int32_t l, LayerWork& w) {
  if (auto s = tap(Tap::HiddenIn, kTapHiddenIn, w.hidden_in); !s) return s;
  if (auto s = decide_mask(l, w.mask, w.active); !s) return s;
  if (auto s = predict(l); !s) return s;
  w.heads_predicted = predicted_heads(l);
  if (auto s = backend_.rmsnorm(Norm::Attention, l); !s) return s;
  if (auto s = tap(Tap::AttentionIn, kTapAttentionIn, w.attention_in); !s) return s;
  static constexpr Proj kQkv[] = {Proj::Q, Proj::K, Proj::V};
  if (w.active != nullptr)  // a mask's computed heads, when it masks some
    for (int32_t h = 0; h < config_.n_heads; ++h)
      if (w.active->heads[size_t(h)] != 0) w.kept_heads.push_back(h);
  if (w.heads_predicted) {  // Q of the predicted heads only
    if (auto s = backend_.linear_predicted(Proj::Q, l); !s) return s;
    if (auto s = project(std::span(kQkv).subspan(1), l); !s) return s;
  } else if (w.active != nullptr && int32_t(w.kept_heads.size()) < config_.n_heads) {  // Q of the computed heads only
    if (auto s = backend_.linear_heads(Proj::Q, l, w.kept_heads); !s) return s;
    if (auto s = project(std::span(kQkv).subspan(1), l); !s) return s;
  } else if (auto s = project(kQkv, l); !s) {
    return s;
  }
  if (config_.qkv_bias)  // on every head's rows; those a mask skipped are not read
    for (Proj p : kQkv)
      if (auto s = backend_.add_bias(p, l); !s) return s;
  return ok_status();
}

// The layer's attention for this pass's sequence (in a batched call, its
// segment is focused): RoPE, the key plan, the append, attention, and the
// hooks that read or change the sequence's cache after it.
Status ForwardPass::layer_attention(int32_t l, LayerWork& w) {
  const ComponentMask* active = w.active;
  if (auto s = backend_.rope(seq_, l, true); !s) return s;
  if (auto s = tap(Tap::Queries, kTapQueries, w.queries); !s) return s;
  if (auto s = tap(Tap::Keys, kTapKeys, w.key_rows); !s) return s;
  if (auto s = tap(Tap::Values, kTapValues, w.value_rows); !s) return s;

  if (auto s = cascade(l); !s) return s;
  KeyPlan decided;
  KeyPlan& keys = staged_.empty() ? decided : staged_[size_t(l)];
  if (staged_.empty())
    if (auto s = decide_keys(l, keys); !s) return s;
  if (keys.any_by_bound())  // sees the cache before this call's tokens
    if (auto s = backend_.select_by_bound(seq_, l, keys); !s) return s;
  if (staged_.empty()) {  // a replayed step counts after the replay
    if (keys.by_bound_per_head && keys.any_by_bound() && step_.decode())
      if (auto s = backend_.read_bound_selection(l, keys); !s) return s;
    count_keys(keys, l, active);
  }
  if (auto s = backend_.append_kv(seq_, l); !s) return s;
  SparsePlan sparse;
  if (auto s = decide_sparse(l, keys, sparse); !s) return s;
  const bool statistics_wanted = method_.has(kHookAttentionFeedback) || method_.has(kHookRetention);
  int64_t values_skipped = 0;
  LayerAttention work{l, &keys, &sparse, active, w.heads_predicted, statistics_wanted};
  if (method_.values.active()) {
    work.values = &method_.values;
    work.values_skipped = &values_skipped;
  }
  const kernels::BitPlanes planes = seq_.pool().bit_planes();
  RequantTally requant;
  if (planes.active() && method_.quant.active()) {
    work.requant = &method_.quant;
    work.requant_tally = &requant;
  }
  if (auto s = backend_.attention(seq_, work); !s) return s;
  const int64_t hd = config_.head_dim;
  if (step_.decode() && !capturing_ && values_skipped > 0) {  // their V bytes were not read
    counters_.decode_values_skipped += values_skipped;
    counters_.decode_kv_bytes_read -= values_skipped * (planes.active() ? kernels::bit_plane_msb_read_bytes(hd, planes)
                                                                        : seq_.pool().row_bytes());
  }
  if (work.requant != nullptr && !capturing_) {
    counters_.requant_rows.resize(size_t(config_.n_layers), 0);
    counters_.requant_refetched.resize(size_t(config_.n_layers), 0);
    counters_.requant_rows[size_t(l)] += requant.rows;
    counters_.requant_refetched[size_t(l)] += requant.refetched;
    if (step_.decode()) {  // the LSB planes the refetched rows read, beside the MSB planes count_keys counted
      counters_.decode_lsb_keys_read += requant.lsb_key_rows;
      counters_.decode_kv_bytes_read +=
          (requant.lsb_key_rows + requant.lsb_value_rows) * kernels::bit_plane_bytes(hd, planes.lsb);
    }
  }
  if (active != nullptr && !capturing_)
    counters_.heads_skipped += std::count(active->heads.begin(), active->heads.end(), uint8_t{0});
  if (auto s = statistics(l); !s) return s;
  if (auto s = retain(l); !s) return s;
  if (auto s = evict(l); !s) return s;
  if (active != nullptr && active->oracle_heads > 0)
    if (auto s = backend_.keep_top_heads(active->oracle_heads, active->heads); !s) return s;
  return tap(Tap::AttentionOut, kTapAttentionOut, w.attention_out);
}

// The layer after its attention, over every row of the call: O, the
// residual, the FFN, rows pruned inside the call, the observer.
Status ForwardPass::layer_output(int32_t l, LayerWork& w) {
  const ComponentMask* active = w.active;
  if (w.heads_predicted) {
    if (auto s = backend_.linear_predicted(Proj::O, l); !s) return s;  // O of the predicted heads only
  } else if (active != nullptr && int32_t(w.kept_heads.size()) < config_.n_heads && active->oracle_heads == 0) {
    if (auto s = backend_.linear_heads(Proj::O, l, w.kept_heads); !s) return s;  // O of the computed heads only
  } else if (auto s = project(std::array{Proj::O}, l); !s) {
    return s;
  }
  if (config_.o_bias)
    if (auto s = backend_.add_bias(Proj::O, l); !s) return s;
  if (auto s = backend_.add_residual(); !s) return s;
  if (auto s = backend_.rmsnorm(Norm::Ffn, l); !s) return s;
  if (auto s = tap(Tap::FfnIn, kTapFfnIn, w.ffn_in); !s) return s;
  if (auto s = ffn(l, active, w.ffn_gate, w.ffn_activation); !s) return s;
  if (auto s = backend_.add_residual(); !s) return s;
  if (auto s = prune_rows(l); !s) return s;
  if (!capturing_) count_sparse_inputs(l);
  if (auto s = tap(Tap::HiddenOut, kTapHiddenOut, w.hidden_out); !s) return s;
  if (observer_ != nullptr)
    observer_->on_layer(CalibrationTaps{0, l, step_.n_tokens, tokens_, w.hidden_in, w.queries, w.key_rows,
                                        w.attention_out, w.ffn_activation, {}, w.value_rows, w.attention_in, w.ffn_in,
                                        w.ffn_gate, w.hidden_out});
  return ok_status();
}

Status ForwardPass::decide_mask(int32_t l, ComponentMask& mask, const ComponentMask*& active) {
  if (!method_.has(kHookComponentMask)) return ok_status();
  std::vector<float> hidden;
  if (auto s = backend_.read_hidden(0, hidden); !s) return s;
  mask.heads.assign(size_t(config_.n_heads), 1);
  if (!method_.method->mask_components(step_, l, hidden, mask)) return ok_status();
  if (auto s = check_component_mask(mask, config_, l); !s) return s;
  active = &mask;
  return ok_status();
}

// The key plan a layer's page budgets alone give: dense heads, and heads whose
// pages the backend selects by key bound (per query head: room for the union
// of the group's selections, each head's own pages being `budget - 1` of the
// same candidates plus the last page).
void ForwardPass::plan_from_budgets(int32_t l, KeyPlan& plan) const {
  const int32_t nkv = config_.n_kv_heads, gs = config_.group_size();
  plan.mode.assign(size_t(nkv), kernels::KeySelect::All);
  plan.budget.assign(size_t(nkv), 0);
  plan.cached.assign(size_t(nkv), 0);
  plan.indptr.assign(1, 0);
  plan.indices.clear();
  plan.heads.clear();
  plan.by_bound_per_head = plan_.bound_per_head && plan_.any_bound(l);
  for (int32_t g = 0; g < nkv; ++g) {
    plan.cached[size_t(g)] = seq_.table(l, g).n_tokens();
    if (const int32_t budget = plan_.budgets[size_t(l)][size_t(g)]; budget > 0) {
      plan.mode[size_t(g)] = kernels::KeySelect::Pages;
      plan.budget[size_t(g)] = budget;
      const int32_t slots = plan.by_bound_per_head ? gs * (budget - 1) + 1 : budget;
      plan.indices.insert(plan.indices.end(), size_t(slots), 0);
    }
    plan.indptr.push_back(int32_t(plan.indices.size()));
  }
  if (plan.by_bound_per_head) plan.heads.assign(plan.indices.size(), 0);
}

// Which cached keys each kv head reads, as one CSR key plan: page budgets,
// select_kv for the heads without one, then the layer's sliding window.
Status ForwardPass::decide_keys(int32_t l, KeyPlan& plan) {
  plan_from_budgets(l, plan);
  if (auto s = select_keys(l, plan); !s) return s;
  return window_binds(l) ? apply_window(l, plan) : ok_status();
}

bool ForwardPass::window_binds(int32_t l) const {
  const int32_t w = config_.window(l);
  return w > 0 && step_.first_position + step_.n_tokens - 1 >= w;
}

// Sliding-window attention: the query at position p reads the keys at
// positions p - window + 1 .. p. Engine::forward runs a call past the window a
// token at a time, so the one row's window is the call's: the cached keys
// before it leave the plan, which then lists the rest as stored tokens
// (positions are the tokens' original ones, whatever a method evicted).
Status ForwardPass::apply_window(int32_t l, KeyPlan& plan) const {
  if (step_.n_tokens != 1)
    return Error{fmt::format("engine: a {}-token call crosses layer {}'s sliding window of {} (Engine::forward runs "
                             "such calls a token at a time)",
                             step_.n_tokens, l, config_.window(l))};
  const int32_t nkv = config_.n_kv_heads, ps = seq_.pool().shape().page_size, gs = config_.group_size();
  const int32_t oldest = step_.first_position - config_.window(l) + 1;
  const bool masked = !plan.heads.empty();
  std::vector<int32_t> indices, indptr{0};
  std::vector<uint32_t> heads;
  for (int32_t g = 0; g < nkv; ++g) {
    if (plan.budget[size_t(g)] > 0)
      return Error{fmt::format("engine: layer {} has a sliding window of {}; a page budget selected by key bound "
                               "(Quest-style) is not supported with it",
                               l, config_.window(l))};
    const std::vector<int32_t>& position = seq_.table(l, g).positions;
    const int32_t cached = plan.cached[size_t(g)], at = plan.indptr[size_t(g)];
    const auto own = plan.head(g);
    auto keep = [&](int32_t t, uint32_t mask) {
      if (position[size_t(t)] < oldest) return;
      indices.push_back(t);
      heads.push_back(mask);
    };
    auto mask_of = [&](size_t j) { return masked ? plan.heads[size_t(at) + j] : group_mask(gs); };
    switch (plan.mode[size_t(g)]) {
      case kernels::KeySelect::All:
        for (int32_t t = 0; t < cached; ++t) keep(t, group_mask(gs));
        break;
      case kernels::KeySelect::Pages:
        for (size_t j = 0; j < own.size(); ++j)
          if (own[j] >= 0)
            for (int32_t t = own[j] * ps; t < std::min(cached, (own[j] + 1) * ps); ++t) keep(t, mask_of(j));
        break;
      default:
        for (size_t j = 0; j < own.size(); ++j)
          if (own[j] >= 0) keep(own[j], mask_of(j));
        break;
    }
    plan.mode[size_t(g)] = kernels::KeySelect::Tokens;
    indptr.push_back(int32_t(indices.size()));
  }
  plan.indices = std::move(indices);
  plan.indptr = std::move(indptr);
  if (masked) plan.heads = std::move(heads);
  return ok_status();
}

// The method's decode selection (select_kv) for the heads without a page budget.
Status ForwardPass::select_keys(int32_t l, KeyPlan& plan) {
  const auto& budgets = plan_.budgets[size_t(l)];
  if (!method_.has(kHookDecodeSelection) || std::none_of(budgets.begin(), budgets.end(), [](int32_t b) { return b < 0; }))
    return ok_status();
  const int32_t nkv = config_.n_kv_heads, ps = seq_.pool().shape().page_size, gs = config_.group_size();
  const int64_t group = int64_t(gs) * config_.head_dim;
  std::vector<float> queries;
  if (auto s = backend_.read_last_queries(queries); !s) return s;
  const auto view = backend_.kv_view(seq_);
  std::vector<int32_t> indices;
  std::vector<int32_t> indptr{0};
  // Head masks for every index, kept when some head selects per query head.
  std::vector<uint32_t> heads;
  bool masked = !plan.heads.empty();
  for (int32_t g = 0; g < nkv; ++g) {
    const auto own = plan.head(g);
    indices.insert(indices.end(), own.begin(), own.end());
    if (plan.heads.empty()) heads.insert(heads.end(), own.size(), group_mask(gs));
    else heads.insert(heads.end(), plan.heads.begin() + plan.indptr[size_t(g)], plan.heads.begin() + plan.indptr[size_t(g) + 1]);
    KvSelection sel;
    if (budgets[size_t(g)] < 0 &&
        method_.method->select_kv(step_, *view, l, g,
                                  std::span<const float>(queries.data() + g * group, size_t(group)), sel)) {
      if (auto s = check_kv_selection(sel, plan.cached[size_t(g)], ps, l, g, gs); !s) return s;
      if (!sel.heads.empty() && !backend_.supports(Feature::QueryHeadSelection))
        return Error{fmt::format("method: decode selection for (layer {}, kv head {}) lists query heads: {}, which "
                                 "the {} backend does not support",
                                 l, g, feature_name(Feature::QueryHeadSelection), backend_.name())};
      plan.mode[size_t(g)] = sel.unit == KvSelection::Unit::Pages ? kernels::KeySelect::Pages : kernels::KeySelect::Tokens;
      indices.insert(indices.end(), sel.indices.begin(), sel.indices.end());
      if (sel.heads.empty()) heads.insert(heads.end(), sel.indices.size(), group_mask(gs));
      else heads.insert(heads.end(), sel.heads.begin(), sel.heads.end());
      masked = masked || !sel.heads.empty();
    }
    indptr.push_back(int32_t(indices.size()));
  }
  plan.indices = std::move(indices);
  plan.indptr = std::move(indptr);
  if (masked) plan.heads = std::move(heads);
  return ok_status();
}

void ForwardPass::count_keys(const KeyPlan& plan, int32_t layer, const ComponentMask* mask) {
  if (!step_.decode()) return;
  const bool predicted = predicted_heads(layer);
  if (predicted) predicted_traffic_.resize(size_t(config_.n_layers) * size_t(config_.n_kv_heads));
  const int32_t ps = seq_.pool().shape().page_size, gs = config_.group_size();
  // K and V, in the pages' format (bit planes: the scale and MSB plane every
  // read touches; the LSB planes of refetched rows are added after attention).
  const kernels::BitPlanes planes = seq_.pool().bit_planes();
  const int64_t row_bytes = planes.active() && method_.quant.active()
                                ? 2 * kernels::bit_plane_msb_read_bytes(config_.head_dim, planes)
                                : seq_.pool().token_bytes();
  for (int32_t g = 0; g < config_.n_kv_heads; ++g) {
    if (mask != nullptr && std::all_of(mask->heads.begin() + int64_t(g) * gs, mask->heads.begin() + int64_t(g + 1) * gs,
                                       [](uint8_t on) { return on == 0; })) {
      ++counters_.kv_heads_skipped;  // every query head masked: the backends read none of its keys
      counters_.decode_keys_cached += plan.cached[size_t(g)];
      continue;
    }
    const HeadTraffic t = head_traffic(plan, g, ps);
    if (predicted)  // counted as read; taken back after the call if the predictors masked the whole group
      predicted_traffic_[size_t(layer) * size_t(config_.n_kv_heads) + size_t(g)] = {t.keys, t.pages, t.keys * row_bytes};
    counters_.decode_keys_read += t.keys;
    counters_.decode_keys_cached += plan.cached[size_t(g)];
    counters_.decode_pages_read += t.pages;
    counters_.decode_kv_bytes_read += t.keys * row_bytes;
  }
}

Status ForwardPass::decide_sparse(int32_t l, const KeyPlan& keys, SparsePlan& sparse) {
  if (!method_.has(kHookPrefillPattern) || step_.decode()) return ok_status();
  const int32_t gs = config_.group_size();
  std::vector<std::optional<PrefillPattern>> patterns(size_t(config_.n_heads));
  bool any = false;
  for (int32_t h = 0; h < config_.n_heads; ++h) {
    PrefillPattern pattern;
    if (!method_.method->prefill_pattern(step_, l, h, pattern)) continue;
    const bool selected = keys.mode[size_t(h / gs)] != kernels::KeySelect::All;
    if (auto s = normalize_prefill_pattern(pattern, l, h, selected); !s) return s;
    patterns[size_t(h)] = std::move(pattern);
    ++counters_.sparse_prefill_heads;
    any = true;
  }
  if (!any) return ok_status();
  if (auto s = backend_.plan_sparse_prefill(seq_, l, patterns, sparse); !s) return s;
  counters_.sparse_prefill_keys_read += sparse.keys_read;
  counters_.sparse_prefill_keys_causal += sparse.keys_causal;
  counters_.sparse_plan_seconds += sparse.plan_seconds;
  return ok_status();
}

Status ForwardPass::statistics(int32_t l) {
  if (!method_.has(kHookAttentionFeedback)) return ok_status();
  LayerStatistics stats;
  if (auto s = backend_.read_statistics(seq_, l, stats); !s) return s;
  const auto view = backend_.kv_view(seq_);
  const int32_t gs = config_.group_size();
  for (int32_t g = 0; g < config_.n_kv_heads; ++g)
    method_.method->on_attention(
        step_, *view,
        AttentionStats{l, g, stats.key_mass[size_t(g)],
                       std::span<const float>(stats.head_norms.data() + int64_t(g) * gs, size_t(gs)),
                       std::span<const float>(stats.head_l1.data() + int64_t(g) * gs, size_t(gs))});
  return ok_status();
}

Status ForwardPass::retain(int32_t l) {
  if (!method_.has(kHookRetention)) return ok_status();
  if (method_.retention.scope == RetentionScope::PerSequence)  // one token set per layer
    for (int32_t g = 1; g < config_.n_kv_heads; ++g)
      if (seq_.table(l, g).positions != seq_.table(l, 0).positions)
        return Error{fmt::format("retention per sequence: the kv heads of layer {} hold different tokens (a method "
                                 "that evicts per head cannot also retain per sequence)",
                                 l)};
  std::vector<std::vector<int32_t>> drops;
  if (auto s = backend_.retain(seq_, l, method_.retention, plan_.retention[size_t(l)], drops); !s) return s;
  if (method_.retention.scope == RetentionScope::PerSequence && !drops.empty() && !drops[0].empty()) {
    // The call's rows are the layer's last stored tokens: those dropped leave the call after this layer;
    // every position dropped leaves the deeper layers before their attention.
    const HeadPageTable& t = seq_.table(l, 0);
    const int32_t first_row = t.n_tokens() - rows();
    for (const int32_t d : drops[0]) {
      if (d >= first_row) pruned_rows_.push_back(d - first_row);
      cascade_positions_.push_back(t.positions[size_t(d)]);
    }
    std::sort(cascade_positions_.begin(), cascade_positions_.end());
  }
  for (int32_t g = 0; g < config_.n_kv_heads; ++g)
    if (!drops[size_t(g)].empty())
      if (auto s = drop_tokens(l, g, std::move(drops[size_t(g)])); !s) return s;
  return ok_status();
}

Status ForwardPass::cascade(int32_t l) {
  if (cascade_positions_.empty()) return ok_status();
  std::vector<int32_t> drop;
  for (int32_t g = 0; g < config_.n_kv_heads; ++g) {
    drop.clear();
    const auto& positions = seq_.table(l, g).positions;
    for (int32_t i = 0; i < int32_t(positions.size()); ++i)
      if (std::binary_search(cascade_positions_.begin(), cascade_positions_.end(), positions[size_t(i)]))
        drop.push_back(i);
    if (!drop.empty())
      if (auto s = drop_tokens(l, g, std::move(drop)); !s) return s;
    drop = {};
  }
  return ok_status();
}

Status ForwardPass::prune_rows(int32_t l) {
  if (pruned_rows_.empty()) return ok_status();
  std::sort(pruned_rows_.begin(), pruned_rows_.end());
  std::vector<int32_t> kept, kept_ids;
  for (int32_t r = 0; r < rows(); ++r)
    if (!std::binary_search(pruned_rows_.begin(), pruned_rows_.end(), r)) {
      kept.push_back(r);
      kept_ids.push_back(row_ids_[size_t(r)]);
    }
  if (kept.empty())
    return Error{fmt::format("method: retention per sequence dropped every token of this call at layer {} (keep "
                             "a recent window of at least one token)",
                             l)};
  counters_.rows_pruned += int64_t(pruned_rows_.size()) * (config_.n_layers - 1 - l);
  pruned_rows_.clear();
  if (auto s = backend_.keep_rows(kept); !s) return s;
  row_ids_ = std::move(kept_ids);
  return ok_status();
}

Status ForwardPass::evict(int32_t l) {
  if (!method_.has(kHookEviction)) return ok_status();
  const auto view = backend_.kv_view(seq_);
  std::vector<int32_t> drop;
  for (int32_t g = 0; g < config_.n_kv_heads; ++g) {
    drop.clear();
    method_.method->evict(step_, *view, l, g, drop);
    if (drop.empty()) continue;
    if (auto s = drop_tokens(l, g, std::move(drop)); !s) return s;
    view->forget(l, g);  // the method may read this head again while evicting the next
    drop = {};
  }
  return ok_status();
}

Status ForwardPass::drop_tokens(int32_t l, int32_t g, std::vector<int32_t> drop) {
  auto dropped = backend_.evict(seq_, l, g, std::move(drop));
  if (!dropped) return Error{"method: " + dropped.message()};
  counters_.tokens_evicted += *dropped;
  if (method_.cache_positions) return backend_.rerotate(seq_, l, g);
  return ok_status();
}

Status ForwardPass::ffn(int32_t l, const ComponentMask* mask, std::vector<float>& gate, std::vector<float>& activation) {
  if (const float t = gate_threshold(l); t >= 0) {  // CATS: the gate decides which neurons up and down compute
    if (auto s = project(std::array{Proj::Gate}, l); !s) return s;
    if (auto s = tap(Tap::FfnGate, kTapFfnGate, gate); !s) return s;
    if (auto s = backend_.gated_swiglu(l, t); !s) return s;
    if (auto s = tap(Tap::FfnActivation, kTapFfnActivation, activation); !s) return s;
    const float down = std::max(0.0f, input_threshold(l, Proj::Down));
    return backend_.linear_sparse(std::array{Proj::Down}, l, std::array{down});
  }
  if (predicted_neurons(l)) {  // only the predicted neurons' rows of gate/up and columns of down
    int32_t neurons = 0, heads = 0;
    if (auto s = backend_.predicted_counts(l, neurons, heads); !s) return s;
    for (Proj p : {Proj::Gate, Proj::Up})
      if (auto s = backend_.linear_predicted(p, l); !s) return s;
    if (auto s = backend_.swiglu(neurons); !s) return s;
    return backend_.linear_predicted(Proj::Down, l);
  }
  if (mask == nullptr || mask->all_neurons) {
    static constexpr Proj kGateUp[] = {Proj::Gate, Proj::Up};
    if (auto s = project(kGateUp, l); !s) return s;
    if (auto s = tap(Tap::FfnGate, kTapFfnGate, gate); !s) return s;
    if (auto s = backend_.swiglu(config_.n_ff); !s) return s;
    if (mask != nullptr && mask->oracle_neurons > 0)  // the oracle: each row's largest activations, chosen now
      if (auto s = backend_.keep_top_neurons(mask->oracle_neurons); !s) return s;
    if (auto s = tap(Tap::FfnActivation, kTapFfnActivation, activation); !s) return s;
    return project(std::array{Proj::Down}, l);
  }
  // Only the selected neurons' rows of gate/up and columns of down are read.
  const auto* rows = &mask->neurons;
  for (Proj p : {Proj::Gate, Proj::Up})
    if (auto s = backend_.linear(p, l, rows); !s) return s;
  if (auto s = backend_.swiglu(int64_t(rows->size())); !s) return s;
  if (!capturing_) counters_.neurons_skipped += config_.n_ff - int64_t(rows->size());
  return backend_.linear(Proj::Down, l, rows);
}

// Activation sparsity: projection p's input threshold at layer l (< 0: dense).
float ForwardPass::input_threshold(int32_t l, Proj p) const {
  return method_.sparsity == nullptr ? -1.0f : method_.sparsity->input(l, int32_t(p));
}

float ForwardPass::gate_threshold(int32_t l) const {
  return method_.sparsity == nullptr ? -1.0f : method_.sparsity->gate(l);
}

// Projections that read the same input, each through its own input threshold
// when the method has activation sparsity.
Status ForwardPass::project(std::span<const Proj> projs, int32_t l) {
  bool sparse = false;
  for (const Proj p : projs) sparse = sparse || input_threshold(l, p) >= 0;
  if (!sparse) return projs.size() == 1 ? backend_.linear(projs[0], l) : backend_.linear_group(projs, l);
  std::vector<Proj> sparse_projs;
  std::vector<float> thresholds;
  for (const Proj p : projs) {
    const float t = input_threshold(l, p);
    if (t < 0) {
      if (auto s = backend_.linear(p, l); !s) return s;
      continue;
    }
    sparse_projs.push_back(p);
    thresholds.push_back(t);
  }
  return backend_.linear_sparse(sparse_projs, l, thresholds);
}

// The input entries layer l's sparse projections read in this call (the
// zeros among them come from the backend after the call).
void ForwardPass::count_sparse_inputs(int32_t l) {
  if (method_.sparsity == nullptr) return;
  counters_.sparse_inputs.resize(size_t(kSparseProjections), 0);
  counters_.sparse_zeros.resize(size_t(kSparseProjections), 0);
  const bool gated = gate_threshold(l) >= 0;
  for (int32_t p = 0; p < kSparseProjections; ++p) {
    const Proj proj = Proj(p);
    const bool counted = input_threshold(l, proj) >= 0 || (gated && (proj == Proj::Up || proj == Proj::Down));
    if (!counted) continue;
    // CATS counts its neurons under Up (the gate's outputs), every other the projection's input
    const int64_t width = proj == Proj::Up && gated ? config_.n_ff : proj_shape(config_, proj).second;
    counters_.sparse_inputs[size_t(p)] += int64_t(rows()) * width;
  }
}

Status ForwardPass::collect_sparsity() {
  if (method_.sparsity == nullptr) return ok_status();
  std::array<int64_t, kSparseProjections> zeros{};
  if (auto s = backend_.read_sparsity(zeros); !s) return s;
  counters_.sparse_zeros.resize(size_t(kSparseProjections), 0);
  for (size_t p = 0; p < zeros.size(); ++p) counters_.sparse_zeros[p] += zeros[p];
  return ok_status();
}

// Before layer l: its neuron predictor, its head predictor when the previous
// layer did not run one for it (layer 0, or after a skipped layer), and the
// next layer's head predictor (the lookahead) from this layer's input.
Status ForwardPass::predict(int32_t l) {
  if (method_.predicted == nullptr) return ok_status();
  const bool own = predicted_heads(l) && (l == 0 || predicted_layer_ != l - 1);
  const bool next = l + 1 < config_.n_layers && predicted_heads(l + 1);
  if (!predicted_neurons(l) && !own && !next) return ok_status();
  if (auto s = backend_.predict(l, own); !s) return s;
  predicted_layer_ = l;
  return ok_status();
}

// After the call: the neurons and heads the predictors skipped, and the keys
// of kv heads whose query heads they all masked (not read: taken back).
Status ForwardPass::collect_predicted() {
  if (method_.predicted == nullptr) return ok_status();
  const int32_t L = config_.n_layers, H = config_.n_heads, gs = config_.group_size();
  std::vector<uint8_t> flags;
  if (!method_.predicted->heads.empty())
    if (auto s = backend_.read_predicted_heads(flags); !s) return s;
  for (int32_t l = 0; l < L; ++l) {
    if (l >= int32_t(computed_.size()) || computed_[size_t(l)] == 0) continue;
    if (predicted_neurons(l) || predicted_heads(l)) {
      int32_t neurons = 0, heads = 0;
      if (auto s = backend_.predicted_counts(l, neurons, heads); !s) return s;
      if (predicted_neurons(l)) counters_.neurons_skipped += config_.n_ff - neurons;
    }
    if (!predicted_heads(l) || flags.size() != size_t(L) * size_t(H)) continue;
    const uint8_t* f = flags.data() + size_t(l) * size_t(H);
    counters_.heads_skipped += std::count(f, f + H, uint8_t{0});
    if (!step_.decode() || predicted_traffic_.empty()) continue;
    for (int32_t g = 0; g < config_.n_kv_heads; ++g) {
      if (std::any_of(f + g * gs, f + (g + 1) * gs, [](uint8_t on) { return on != 0; })) continue;
      const auto& [keys, pages, bytes] = predicted_traffic_[size_t(l) * size_t(config_.n_kv_heads) + size_t(g)];
      ++counters_.kv_heads_skipped;
      counters_.decode_keys_read -= keys;
      counters_.decode_pages_read -= pages;
      counters_.decode_kv_bytes_read -= bytes;
    }
  }
  return ok_status();
}

// A batched call over several sequences (run_batch): one ForwardPass per
// member keeps that member's plan, method state and counters' view; the
// row-wise parts of each layer run once, through the first member's pass.
class BatchedCall {
 public:
  // Sequences a replayed batched step may hold (their logits: one chunk of rows).
  static constexpr int64_t kMaxReplayedBatch = 64;

  BatchedCall(Backend& backend, const ModelConfig& config, const EngineOptions& options, EngineCounters& counters,
              std::span<BatchMember> members)
      : backend_(backend), config_(config), counters_(counters), members_(members) {
    for (BatchMember& m : members)
      passes_.push_back(std::make_unique<ForwardPass>(backend, config, options, m.call, counters, *m.seq, m.tokens));
  }

  Status run() {
    for (auto& p : passes_)
      if (auto s = p->plan_step(); !s) return s;
    if (!fusable()) {
      ++counters_.batch_fallbacks;
      for (size_t i = 0; i < passes_.size(); ++i)
        if (auto s = passes_[i]->run_planned(members_[i].logits_from, *members_[i].sink); !s) return s;
      return ok_status();
    }
    return run_fused();
  }

 private:
  // What a batched call cannot give a member: its own layer plan, a
  // host-side exit (exit_after_layer reads each row back), component masks
  // and predictors (a choice per call, which a batch would share), rows
  // pruned inside a call. Exits by confidence are given: an exited
  // sequence stays in the call as a frozen row (run_fused).
  bool fusable() const {
    if (passes_.size() < 2 || !backend_.supports(Feature::BatchedCalls)) return false;
    const ForwardPass& first = *passes_.front();
    const MethodCall& m = first.method_;
    if (m.has(kHookComponentMask) || m.has(kHookLayerExit) || m.predicted != nullptr) return false;
    if (m.has(kHookRetention) && m.retention.scope == RetentionScope::PerSequence) return false;
    for (const auto& p : passes_) {
      if (p->plan_.run != first.plan_.run || p->plan_.kv_fill != first.plan_.kv_fill) return false;
      if (p->plan_.exit_checks && p->rows() != 1) return false;
      if (p->method_.cache_positions != m.cache_positions) return false;
      for (int32_t l = 0; l < config_.n_layers; ++l)
        if (p->window_binds(l)) return false;
    }
    return true;
  }

  Status run_fused() {
    const int32_t L = config_.n_layers;
    std::vector<int32_t> tokens;
    std::vector<CallSegment> segments;
    for (auto& p : passes_) {
      segments.push_back({int32_t(tokens.size()), int32_t(p->tokens_.size()), p->step_.first_position});
      tokens.insert(tokens.end(), p->tokens_.begin(), p->tokens_.end());
      ++counters_.forward_calls;
      if (p->step_.decode()) ++counters_.decode_steps;
    }
    ++counters_.batched_calls;
    counters_.batched_sequences += int64_t(passes_.size());
    ForwardPass& lead = *passes_.front();
    if (auto s = backend_.begin_call({tokens, segments.front().first_position, lead.method_.cache_positions, segments});
        !s)
      return s;
    if (replayable()) {
      auto replayed = try_replay();
      if (!replayed) return replayed.error();
      if (*replayed) {
        if (auto s = lead.collect_sparsity(); !s) return s;
        double attention_seconds = 0;
        return backend_.end_call(attention_seconds);
      }
    }
    if (auto s = backend_.embed(); !s) return s;
    for (auto& p : passes_) p->computed_.assign(size_t(L), 0);
    exited_.assign(passes_.size(), -1);
    for (int32_t l = 0; l < L; ++l) {
      const bool all_exited = std::all_of(exited_.begin(), exited_.end(), [](int32_t e) { return e >= 0; });
      if (lead.plan_.run[size_t(l)] == 0 || all_exited) {
        if (auto s = skip_layer(l, all_exited ? lead.method_.exit->kv_fill : lead.plan_.kv_fill); !s) return s;
        continue;
      }
      ++counters_.batched_layers;
      for (size_t i = 0; i < passes_.size(); ++i)  // the state measure compares a layer's output with its input
        if (const ExitLayout* policy = checking(i); policy != nullptr && policy->checks(l) &&
                                                    policy->measure == ExitMeasure::State)
          if (auto s = focused(i, [&] { return backend_.keep_exit_state(); }); !s) return s;
      ForwardPass::LayerWork work;
      if (auto s = lead.layer_input(l, work); !s) return s;
      for (size_t i = 0; i < passes_.size(); ++i) {
        ForwardPass& p = *passes_[i];
        auto attend = [&]() -> Status {
          if (exited_[i] < 0) {
            ForwardPass::LayerWork own;
            return p.layer_attention(l, own);
          }
          if (p.method_.exit->kv_fill == SkippedLayerKv::None) return ok_status();
          return p.append_skipped_kv(l);  // a frozen row's K/V: the exit state's
        };
        if (auto s = focused(i, attend); !s) return s;
      }
      if (auto s = lead.layer_output(l, work); !s) return s;  // counts the lead's sparse inputs
      for (size_t i = 0; i < passes_.size(); ++i) {
        ForwardPass& p = *passes_[i];
        if (i > 0) p.count_sparse_inputs(l);
        if (exited_[i] >= 0) {  // frozen: the layer ran over its row, which gets its state back
          ++counters_.layers_skipped;
          if (p.method_.exit->kv_fill != SkippedLayerKv::None) ++counters_.kv_fills_propagated;
          if (auto s = focused(i, [&] { return backend_.stash_segment(true); }); !s) return s;
          continue;
        }
        p.computed_[size_t(l)] = 1;
        if (p.step_.decode()) ++counters_.decode_layers_run;
        const ExitLayout* policy = checking(i);
        if (policy == nullptr || !policy->checks(l)) continue;
        Result<float> confidence = 0.0f;
        if (auto s = focused(i, [&] {
              confidence = backend_.exit_confidence(l);
              return confidence ? ok_status() : Status(confidence.error());
            });
            !s)
          return s;
        ++counters_.exit_checks;
        if (double(*confidence) <= p.plan_.exit_threshold) continue;
        exited_[i] = l;
        p.count_exit(l);
        if (auto s = focused(i, [&] { return backend_.stash_segment(false); }); !s) return s;
      }
    }
    for (size_t i = 0; i < passes_.size(); ++i)  // an exit's logits come from its state, through its exit head
      if (exited_[i] >= 0 && passes_[i]->method_.exit->maps(exited_[i]))
        if (auto s = focused(i, [&] { return backend_.apply_exit_head(exited_[i]); }); !s) return s;
    for (auto& p : passes_) p->finish_call();
    if (auto s = lead.collect_sparsity(); !s) return s;
    for (size_t i = 0; i < passes_.size(); ++i) {
      const BatchMember& m = members_[i];
      const int64_t n = int64_t(m.tokens.size()), from = std::max<int64_t>(m.logits_from, 0);
      if (from >= n || m.sink == nullptr || !*m.sink) continue;
      const int64_t r0 = segments[i].row_from;
      const LogitsSink& sink = *m.sink;
      const LogitsSink local = [&](int64_t row, std::span<const float> logits) { sink(row - r0, logits); };
      if (auto s = backend_.logits(r0 + from, n - from, local); !s) return s;
      counters_.logits_rows += n - from;
    }
    double attention_seconds = 0;
    auto s = backend_.end_call(attention_seconds);
    counters_.attention_seconds += attention_seconds;
    return s;
  }

  // A batched step a graph may serve: every member a one-token decode step
  // whose plan needs nothing from the host mid-step (so no exit checks), the
  // logits of all in one chunk.
  bool replayable() const {
    const ForwardPass& lead = *passes_.front();
    if (!lead.options_.cuda_graphs || lead.options_.time_attention || !backend_.supports(Feature::Graphs)) return false;
    if (int64_t(passes_.size()) > kMaxReplayedBatch) return false;
    for (const auto& p : passes_)
      if (!p->plan_.replayable() || !p->step_.decode() || p->rows() != 1) return false;
    return true;
  }

  // Staged for every member (each into its own staging slot, focused),
  // captured the first time the batch's shape is seen (the fused schedule in
  // capture mode), then replayed. False: the step runs eagerly, from the
  // caches as they were.
  Result<bool> try_replay() {
    const int32_t L = config_.n_layers;
    ForwardPass& lead = *passes_.front();
    for (auto& p : passes_) {
      p->staged_.assign(size_t(L), KeyPlan{});
      for (int32_t l = 0; l < L; ++l)
        if (p->plan_.run[size_t(l)] != 0) p->plan_from_budgets(l, p->staged_[size_t(l)]);
    }
    size_t reserved = 0;  // members whose new token may hold reserved slots
    auto undo = [&](const Status& why) -> Status {
      for (auto& p : passes_) p->staged_.clear();
      for (size_t i = 0; i < reserved; ++i)
        if (auto s = backend_.truncate(passes_[i]->seq_, passes_[i]->step_.first_position); !s) return s;
      return why;
    };
    for (size_t i = 0; i < passes_.size(); ++i) {
      ForwardPass& p = *passes_[i];
      bool ready = false;
      const Status staged = focused(i, [&]() -> Status {
        auto r = backend_.prepare_replay(p.seq_, p.plan_, p.staged_);
        if (!r) return r.error();
        ready = *r;
        return ok_status();
      });
      reserved = i + 1;
      if (!staged) return undo(staged).error();
      if (!ready) {
        if (auto s = undo(ok_status()); !s) return s.error();
        return false;
      }
    }
    if (!backend_.has_graph(lead.plan_)) {
      const Status body = capture_step(
          backend_, lead.plan_, int64_t(passes_.size()),
          [&](bool on) {
            for (auto& p : passes_) p->capturing_ = on;
          },
          [&] { return captured_layers(); });
      if (!body) {  // no graph: the step runs eagerly instead
        if (auto s = undo(ok_status()); !s) return s.error();
        return false;
      }
    }
    bool wanted = false;
    for (const BatchMember& m : members_) wanted = wanted || (m.logits_from <= 0 && m.sink != nullptr && *m.sink);
    const LogitsSink sink = [&](int64_t row, std::span<const float> logits) {
      const BatchMember& m = members_[size_t(row)];
      if (m.logits_from > 0 || m.sink == nullptr || !*m.sink) return;
      (*m.sink)(0, logits);
      ++counters_.logits_rows;
    };
    if (auto s = backend_.replay(lead.plan_, wanted ? sink : LogitsSink{}); !s) return undo(s).error();
    for (auto& p : passes_)
      if (auto s = p->count_replayed(); !s) return s.error();
    for (int32_t l = 0; l < L; ++l)
      if (lead.plan_.run[size_t(l)] != 0) ++counters_.batched_layers;
    return true;
  }

  // The fused schedule's layers in capture mode (counted after the replay):
  // no member exits or reads anything back mid-step.
  Status captured_layers() {
    ForwardPass& lead = *passes_.front();
    if (auto s = backend_.embed(); !s) return s;
    for (int32_t l = 0; l < config_.n_layers; ++l) {
      if (lead.plan_.run[size_t(l)] == 0) {
        if (lead.plan_.kv_fill == SkippedLayerKv::None) continue;
        if (auto s = lead.skipped_kv(l); !s) return s;
        for (size_t i = 0; i < passes_.size(); ++i)
          if (auto s = focused(i, [&] { return passes_[i]->append_skipped_kv(l); }); !s) return s;
        continue;
      }
      ForwardPass::LayerWork work;
      if (auto s = lead.layer_input(l, work); !s) return s;
      for (size_t i = 0; i < passes_.size(); ++i) {
        ForwardPass::LayerWork own;
        if (auto s = focused(i, [&] { return passes_[i]->layer_attention(l, own); }); !s) return s;
      }
      if (auto s = lead.layer_output(l, work); !s) return s;
    }
    return ok_status();
  }

  // The member's exit policy when this step checks its confidence.
  const ExitLayout* checking(size_t i) const {
    const ForwardPass& p = *passes_[i];
    return p.plan_.exit_checks && p.rows() == 1 ? p.method_.exit : nullptr;
  }

  // `op` on member i's segment alone.
  template <typename Op>
  Status focused(size_t i, Op op) {
    if (auto s = backend_.focus_segment(int32_t(i)); !s) return s;
    Status done = op();
    Status back = backend_.unfocus_segment();
    return done ? back : done;
  }

  // A layer every member's plan skips, or after every member exited: K/V of
  // the passing hidden state (when `fill` says so) projected for every row,
  // rotated and appended per member.
  Status skip_layer(int32_t l, SkippedLayerKv fill) {
    for (auto& p : passes_) {
      ++counters_.layers_skipped;
      if (fill != SkippedLayerKv::None) counters_.kv_fills_propagated += p->rows();
    }
    if (fill == SkippedLayerKv::None) return ok_status();
    if (auto s = passes_.front()->skipped_kv(l); !s) return s;
    for (size_t i = 0; i < passes_.size(); ++i)
      if (auto s = focused(i, [&] { return passes_[i]->append_skipped_kv(l); }); !s) return s;
    return ok_status();
  }

  Backend& backend_;
  const ModelConfig& config_;
  EngineCounters& counters_;
  std::span<BatchMember> members_;
  std::vector<std::unique_ptr<ForwardPass>> passes_;
  std::vector<int32_t> exited_;  // per member: the layer it exited after (-1: running)
};

Status run_batch(Backend& backend, const ModelConfig& config, const EngineOptions& options, EngineCounters& counters,
                 std::span<BatchMember> members) {
  BatchedCall call(backend, config, options, counters, members);
  return call.run();
}

}  // namespace inferlab
