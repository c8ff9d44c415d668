#include "engine/cpu_engine.h"

#include <fmt/format.h>
#include <omp.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstring>

#include "cpu/cpu_ops.h"
#include "engine/device.h"

namespace inferlab {

namespace cpu = kernels::cpu;

namespace {
constexpr int64_t kLogitsChunkRows = 64;  // rows of logits computed per GEMM
}  // namespace

CpuEngine::CpuEngine(std::shared_ptr<const Model> model, EngineOptions options)
    : Engine(std::move(model), options) {
  const ModelConfig& c = model_->config();
  pool_ = std::make_shared<KvPagePool>(KvCacheShape{c.n_layers, c.n_kv_heads, c.head_dim, options_.page_size});
  bound_sync_.assign(size_t(c.n_layers) * size_t(c.n_kv_heads), PageBoundSync{});
  if (options_.n_threads > 0) omp_set_num_threads(options_.n_threads);
}

std::string CpuEngine::device_description() const { return "cpu: " + cpu_description(); }

int64_t CpuEngine::weight_bytes() const { return model_->parameter_count() * int64_t(sizeof(float)); }

void CpuEngine::ensure_workspace(int64_t n) {
  if (n <= workspace_tokens_) return;
  const ModelConfig& c = config();
  x_.resize(size_t(n * c.n_embd));
  xn_.resize(size_t(n * c.n_embd));
  q_.resize(size_t(n * c.q_dim()));
  k_.resize(size_t(n * c.kv_dim()));
  v_.resize(size_t(n * c.kv_dim()));
  attn_.resize(size_t(n * c.q_dim()));
  proj_.resize(size_t(n * c.n_embd));
  gate_.resize(size_t(n * c.n_ff));
  up_.resize(size_t(n * c.n_ff));
  positions_.resize(size_t(n));
  workspace_tokens_ = n;
}

Status CpuEngine::forward(KvSequence& seq, std::span<const int32_t> tokens, int64_t logits_from,
                       const LogitsSink& sink) {
  const ModelConfig& c = config();
  const ModelWeights& w = model_->weights();
  const int64_t n = int64_t(tokens.size());
  if (n == 0) return ok_status();
  if (auto s = check_call(seq, tokens); !s) return s;
  ensure_workspace(n);

  const StepInfo step{seq.forward_calls(), seq.n_past(), int32_t(n)};
  for (int64_t i = 0; i < n; ++i) {
    positions_[size_t(i)] = step.first_position + int32_t(i);
    std::memcpy(&x_[size_t(i * c.n_embd)], &w.token_embd[size_t(int64_t(tokens[size_t(i)]) * c.n_embd)],
                size_t(c.n_embd) * sizeof(float));
  }
  ++counters_.forward_calls;
  if (step.decode()) ++counters_.decode_steps;

  LayerPlan plan;
  plan.run.assign(size_t(c.n_layers), 1);
  if ((hooks_ & kHookLayerPlan) != 0 && method_->plan_layers(step, plan) &&
      plan.run.size() != size_t(c.n_layers))
    return Error{fmt::format("method: layer plan has {} entries, the model has {} layers", plan.run.size(),
                             c.n_layers)};
  bool exited = false;
  for (int32_t l = 0; l < c.n_layers; ++l) {
    if (exited || plan.run[size_t(l)] == 0) {
      fill_skipped_layer(seq, step, l, plan.kv_fill);
      ++counters_.layers_skipped;
      continue;
    }
    if (auto s = run_layer(seq, step, l); !s) return s;
    if ((hooks_ & kHookLayerPlan) != 0 && l + 1 < c.n_layers)
      exited = method_->exit_after_layer(
          step, l, std::span<const float>(&x_[size_t((n - 1) * c.n_embd)], size_t(c.n_embd)));
  }
  seq.set_n_past(step.first_position + int32_t(n));
  seq.count_forward_call();

  if (logits_from < 0) logits_from = 0;
  if (logits_from >= n || !sink) return ok_status();
  const int64_t n_rows = n - logits_from;
  cpu::rmsnorm(xn_.data(), x_.data() + logits_from * c.n_embd, w.output_norm.data(), n_rows, c.n_embd, c.rms_eps);
  const int64_t chunk = std::min(n_rows, kLogitsChunkRows);
  logits_.resize(size_t(chunk * c.n_vocab));
  for (int64_t r0 = 0; r0 < n_rows; r0 += chunk) {
    const int64_t rows = std::min(chunk, n_rows - r0);
    cpu::matmul_xwt(logits_.data(), xn_.data() + r0 * c.n_embd, w.lm_head(), rows, c.n_vocab, c.n_embd);
    for (int64_t r = 0; r < rows; ++r)
      sink(logits_from + r0 + r, std::span<const float>(logits_.data() + r * c.n_vocab, size_t(c.n_vocab)));
  }
  return ok_status();
}

Status CpuEngine::run_layer(KvSequence& seq, const StepInfo& step, int32_t l) {
  const ModelConfig& c = config();
  const LayerWeights& lw = model_->weights().layers[size_t(l)];
  const int64_t n = step.n_tokens;
  ComponentMask mask;
  const ComponentMask* active_mask = nullptr;
  if ((hooks_ & kHookComponentMask) != 0) {
    mask.heads.assign(size_t(c.n_heads), 1);
    if (method_->mask_components(step, l, std::span<const float>(x_.data(), size_t(n * c.n_embd)), mask)) {
      if (auto s = check_component_mask(mask, c, l); !s) return s;
      active_mask = &mask;
    }
  }
  cpu::rmsnorm(xn_.data(), x_.data(), lw.attn_norm.data(), n, c.n_embd, c.rms_eps);
  cpu::matmul_xwt(q_.data(), xn_.data(), lw.wq.data(), n, c.q_dim(), c.n_embd);
  cpu::matmul_xwt(k_.data(), xn_.data(), lw.wk.data(), n, c.kv_dim(), c.n_embd);
  cpu::matmul_xwt(v_.data(), xn_.data(), lw.wv.data(), n, c.kv_dim(), c.n_embd);
  apply_rope(seq, l, n, true);
  const auto t0 = options_.time_attention ? std::chrono::steady_clock::now() : std::chrono::steady_clock::time_point{};
  if (auto s = attention_layer(seq, step, l, active_mask); !s) return s;
  if (options_.time_attention)
    counters_.attention_seconds += std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  cpu::matmul_xwt(proj_.data(), attn_.data(), lw.wo.data(), n, c.n_embd, c.q_dim());
  cpu::add_inplace(x_.data(), proj_.data(), n, c.n_embd);

  cpu::rmsnorm(xn_.data(), x_.data(), lw.ffn_norm.data(), n, c.n_embd, c.rms_eps);
  if (auto s = ffn_layer(l, n, active_mask); !s) return s;
  cpu::add_inplace(x_.data(), proj_.data(), n, c.n_embd);
  return ok_status();
}

Status CpuEngine::ffn_layer(int32_t l, int64_t n, const ComponentMask* mask) {
  const ModelConfig& c = config();
  const LayerWeights& lw = model_->weights().layers[size_t(l)];
  if (mask == nullptr || mask->all_neurons) {
    cpu::matmul_xwt(gate_.data(), xn_.data(), lw.w_gate.data(), n, c.n_ff, c.n_embd);
    cpu::matmul_xwt(up_.data(), xn_.data(), lw.w_up.data(), n, c.n_ff, c.n_embd);
    cpu::silu_mul(gate_.data(), up_.data(), n, c.n_ff);
    cpu::matmul_xwt(proj_.data(), gate_.data(), lw.w_down.data(), n, c.n_embd, c.n_ff);
    return ok_status();
  }
  // Only the selected neurons' rows of gate/up and of the transposed down weight are read.
  const int64_t k = int64_t(mask->neurons.size());
  const int32_t* rows = mask->neurons.data();
  cpu::matmul_xwt_rows(gate_.data(), xn_.data(), lw.w_gate.data(), rows, n, k, c.n_embd);
  cpu::matmul_xwt_rows(up_.data(), xn_.data(), lw.w_up.data(), rows, n, k, c.n_embd);
  cpu::silu_mul(gate_.data(), up_.data(), n, k);
  cpu::matmul_x_rows(proj_.data(), gate_.data(), w_down_transposed(l).data(), rows, n, k, c.n_embd);
  counters_.neurons_skipped += c.n_ff - k;
  return ok_status();
}

const std::vector<float>& CpuEngine::w_down_transposed(int32_t l) {
  const ModelConfig& c = config();
  if (w_down_t_.empty()) w_down_t_.resize(size_t(c.n_layers));
  std::vector<float>& t = w_down_t_[size_t(l)];
  if (t.empty()) {
    const std::vector<float>& w = model_->weights().layers[size_t(l)].w_down;  // (n_embd, n_ff)
    t.resize(w.size());
    for (int64_t e = 0; e < c.n_embd; ++e)
      for (int64_t j = 0; j < c.n_ff; ++j) t[size_t(j * c.n_embd + e)] = w[size_t(e * c.n_ff + j)];
  }
  return t;
}

void CpuEngine::fill_skipped_layer(KvSequence& seq, const StepInfo& step, int32_t l, SkippedLayerKv fill) {
  if (fill == SkippedLayerKv::None) return;
  // The layer is an identity on the residual stream; its cache still gets the
  // K/V of the hidden state that passes it, so later tokens can attend to it.
  const ModelConfig& c = config();
  const LayerWeights& lw = model_->weights().layers[size_t(l)];
  const int64_t n = step.n_tokens, hd = c.head_dim;
  cpu::rmsnorm(xn_.data(), x_.data(), lw.attn_norm.data(), n, c.n_embd, c.rms_eps);
  cpu::matmul_xwt(k_.data(), xn_.data(), lw.wk.data(), n, c.kv_dim(), c.n_embd);
  cpu::matmul_xwt(v_.data(), xn_.data(), lw.wv.data(), n, c.kv_dim(), c.n_embd);
  apply_rope(seq, l, n, false);
  for (int32_t g = 0; g < c.n_kv_heads; ++g)
    for (int64_t i = 0; i < n; ++i)
      seq.append(l, g, &k_[size_t(i * c.kv_dim() + g * hd)], &v_[size_t(i * c.kv_dim() + g * hd)],
                 positions_[size_t(i)], rotary_position(g, i));
}

void CpuEngine::apply_rope(KvSequence& seq, int32_t l, int64_t n, bool queries) {
  const ModelConfig& c = config();
  if (!cache_positions_) {
    if (queries)
      cpu::rope(q_.data(), n, c.n_heads, c.head_dim, c.rope_dim, positions_.data(), c.rope_theta, c.rope_neox);
    cpu::rope(k_.data(), n, c.n_kv_heads, c.head_dim, c.rope_dim, positions_.data(), c.rope_theta, c.rope_neox);
    return;
  }
  // Each kv head's new tokens continue its own stored count.
  const int64_t hd = c.head_dim, gs = c.group_size();
  group_positions_.resize(size_t(c.n_kv_heads * n));
  call_tokens_ = n;
  for (int32_t g = 0; g < c.n_kv_heads; ++g) {
    int32_t* pos = &group_positions_[size_t(g * n)];
    for (int64_t i = 0; i < n; ++i) pos[i] = seq.table(l, g).n_tokens() + int32_t(i);
    cpu::rope_strided(&k_[size_t(g * hd)], n, c.kv_dim(), 1, hd, c.rope_dim, pos, c.rope_theta, c.rope_neox);
    if (queries)
      cpu::rope_strided(&q_[size_t(g * gs * hd)], n, c.q_dim(), gs, hd, c.rope_dim, pos, c.rope_theta, c.rope_neox);
  }
}

int32_t CpuEngine::rotary_position(int32_t g, int64_t i) const {
  return cache_positions_ ? group_positions_[size_t(g * call_tokens_ + i)] : positions_[size_t(i)];
}

void CpuEngine::rerotate_keys(KvSequence& seq, int32_t l, int32_t g) {
  // RoPE rotations compose: turning a key by (new - old) positions equals
  // rotating the unrotated key at its new position.
  // Eviction shifts runs of tokens by the same amount: rotate each run (within
  // a page, where rows are contiguous) with one set of angles.
  const ModelConfig& c = config();
  HeadPageTable& t = seq.table(l, g);
  const int32_t ps = seq.pool().shape().page_size;
  for (int32_t i = 0; i < t.n_tokens();) {
    const int32_t delta = i - t.rotary[size_t(i)];
    int32_t end = i + 1;
    while (end < t.n_tokens() && end % ps != 0 && end - t.rotary[size_t(end)] == delta) ++end;
    if (delta != 0) {
      cpu::rope_shift(seq.k_row_mutable(l, g, i), end - i, c.head_dim, c.head_dim, c.rope_dim, delta, c.rope_theta,
                      c.rope_neox);
      for (int32_t j = i; j < end; ++j) t.rotary[size_t(j)] = j;
    }
    i = end;
  }
}

}  // namespace inferlab
