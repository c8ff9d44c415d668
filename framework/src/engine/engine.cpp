#include "engine/engine.h"

#include <fmt/format.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstring>

#include "cpu/cpu_ops.h"

namespace inferlab {

namespace cpu = kernels::cpu;

namespace {
constexpr int64_t kLogitsChunkRows = 64;  // rows of logits computed per GEMM
constexpr int64_t kQueryChunkRows = 16;   // attention work item: (head, 16 query rows)
}  // namespace

Result<std::unique_ptr<Engine>> Engine::create(std::shared_ptr<const Model> model, EngineOptions options) {
  if (!model) return Error{"engine: no model"};
  if (options.page_size <= 0 || options.page_size > 65536)
    return Error{fmt::format("engine: page_size {} is out of range (1..65536)", options.page_size)};
  if (options.max_context < 0) return Error{fmt::format("engine: max_context {} is negative", options.max_context)};
  if (options.n_threads < 0) return Error{fmt::format("engine: n_threads {} is negative", options.n_threads)};
  return std::unique_ptr<Engine>(new Engine(std::move(model), options));
}

Engine::Engine(std::shared_ptr<const Model> model, EngineOptions options)
    : model_(std::move(model)), options_(options) {
  const ModelConfig& c = model_->config();
  max_context_ = options_.max_context > 0 ? options_.max_context : c.context_length;
  pool_ = std::make_shared<KvPagePool>(KvCacheShape{c.n_layers, c.n_kv_heads, c.head_dim, options_.page_size});
  if (options_.n_threads > 0) omp_set_num_threads(options_.n_threads);
}

std::unique_ptr<KvSequence> Engine::new_sequence() const { return std::make_unique<KvSequence>(pool_); }

void Engine::ensure_workspace(int64_t n) {
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

Status Engine::forward(KvSequence& seq, std::span<const int32_t> tokens, int64_t logits_from,
                       const LogitsSink& sink) {
  const ModelConfig& c = config();
  const ModelWeights& w = model_->weights();
  const int64_t n = int64_t(tokens.size());
  if (n == 0) return ok_status();
  if (int64_t(seq.n_past()) + n > max_context_)
    return Error{fmt::format("context length exceeded: {} cached + {} new tokens > max context {}", seq.n_past(),
                             n, max_context_)};
  for (int64_t i = 0; i < n; ++i)
    if (tokens[size_t(i)] < 0 || tokens[size_t(i)] >= c.n_vocab)
      return Error{fmt::format("token id {} at index {} is outside the vocabulary (0..{})", tokens[size_t(i)], i,
                               c.n_vocab - 1)};
  ensure_workspace(n);

  const int32_t n_cached_before = seq.n_past();
  for (int64_t i = 0; i < n; ++i) {
    positions_[size_t(i)] = n_cached_before + int32_t(i);
    std::memcpy(&x_[size_t(i * c.n_embd)], &w.token_embd[size_t(int64_t(tokens[size_t(i)]) * c.n_embd)],
                size_t(c.n_embd) * sizeof(float));
  }

  for (int32_t l = 0; l < c.n_layers; ++l) {
    const LayerWeights& lw = w.layers[size_t(l)];
    cpu::rmsnorm(xn_.data(), x_.data(), lw.attn_norm.data(), n, c.n_embd, c.rms_eps);
    cpu::matmul_xwt(q_.data(), xn_.data(), lw.wq.data(), n, c.q_dim(), c.n_embd);
    cpu::matmul_xwt(k_.data(), xn_.data(), lw.wk.data(), n, c.kv_dim(), c.n_embd);
    cpu::matmul_xwt(v_.data(), xn_.data(), lw.wv.data(), n, c.kv_dim(), c.n_embd);
    cpu::rope(q_.data(), n, c.n_heads, c.head_dim, c.rope_dim, positions_.data(), c.rope_theta, c.rope_neox);
    cpu::rope(k_.data(), n, c.n_kv_heads, c.head_dim, c.rope_dim, positions_.data(), c.rope_theta, c.rope_neox);
    attention_layer(seq, l, n, n_cached_before);
    cpu::matmul_xwt(proj_.data(), attn_.data(), lw.wo.data(), n, c.n_embd, c.q_dim());
    cpu::add_inplace(x_.data(), proj_.data(), n, c.n_embd);

    cpu::rmsnorm(xn_.data(), x_.data(), lw.ffn_norm.data(), n, c.n_embd, c.rms_eps);
    cpu::matmul_xwt(gate_.data(), xn_.data(), lw.w_gate.data(), n, c.n_ff, c.n_embd);
    cpu::matmul_xwt(up_.data(), xn_.data(), lw.w_up.data(), n, c.n_ff, c.n_embd);
    cpu::silu_mul(gate_.data(), up_.data(), n, c.n_ff);
    cpu::matmul_xwt(proj_.data(), gate_.data(), lw.w_down.data(), n, c.n_embd, c.n_ff);
    cpu::add_inplace(x_.data(), proj_.data(), n, c.n_embd);
  }
  seq.set_n_past(n_cached_before + int32_t(n));

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

void Engine::attention_layer(KvSequence& seq, int32_t layer, int64_t n, int32_t n_cached_before) {
  const ModelConfig& c = config();
  const int64_t hd = c.head_dim;
  // Append the new K/V rows of every kv head, then attend over the pages.
  std::vector<std::vector<cpu::KvPageRef>> page_refs(size_t(c.n_kv_heads));
  std::vector<int32_t> cached_before(size_t(c.n_kv_heads));
  for (int32_t g = 0; g < c.n_kv_heads; ++g) {
    cached_before[size_t(g)] = seq.table(layer, g).n_tokens();
    for (int64_t i = 0; i < n; ++i)
      seq.append(layer, g, &k_[size_t(i * c.kv_dim() + g * hd)], &v_[size_t(i * c.kv_dim() + g * hd)],
                 n_cached_before + int32_t(i));
    const HeadPageTable& t = seq.table(layer, g);
    const int32_t ps = seq.pool().shape().page_size;
    auto& refs = page_refs[size_t(g)];
    refs.reserve(t.pages.size());
    for (size_t p = 0; p < t.pages.size(); ++p) {
      const int32_t tokens_in_page = std::min<int32_t>(ps, t.n_tokens() - int32_t(p) * ps);
      refs.push_back({seq.pool().k(t.pages[p]), seq.pool().v(t.pages[p]), tokens_in_page});
    }
  }
  const float scale = 1.0f / std::sqrt(float(hd));
  const int64_t n_chunks = (n + kQueryChunkRows - 1) / kQueryChunkRows;
  const int64_t work = int64_t(c.n_heads) * n_chunks;
#pragma omp parallel for schedule(dynamic) if (work > 1)
  for (int64_t item = 0; item < work; ++item) {
    const int32_t h = int32_t(item / n_chunks);
    const int64_t i0 = (item % n_chunks) * kQueryChunkRows;
    const int64_t rows = std::min(kQueryChunkRows, n - i0);
    const int32_t g = h / c.group_size();
    int32_t visible[kQueryChunkRows];
    for (int64_t r = 0; r < rows; ++r) visible[r] = cached_before[size_t(g)] + int32_t(i0 + r) + 1;
    const auto& refs = page_refs[size_t(g)];
    cpu::attention_paged(&q_[size_t(i0 * c.q_dim() + h * hd)], rows, c.q_dim(), refs.data(), int64_t(refs.size()),
                         visible, hd, scale, &attn_[size_t(i0 * c.q_dim() + h * hd)], c.q_dim(), nullptr);
  }
}

Result<std::vector<float>> Engine::prefill(KvSequence& seq, std::span<const int32_t> tokens) {
  std::vector<float> last;
  auto status = forward(seq, tokens, int64_t(tokens.size()) - 1,
                        [&](int64_t, std::span<const float> logits) { last.assign(logits.begin(), logits.end()); });
  if (!status) return status.error();
  return last;
}

Result<std::vector<float>> Engine::decode(KvSequence& seq, int32_t token) {
  return prefill(seq, std::span<const int32_t>(&token, 1));
}

}  // namespace inferlab
