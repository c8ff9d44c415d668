#include "engine/cpu_backend.h"

#include <fmt/format.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <map>

#include "cpu/activation_sparse.h"
#include "cpu/cpu_twins.h"
#include "engine/backend_factory.h"
#include "engine/device.h"
#include "gguf/gguf.h"

namespace inferlab {

namespace cpu = kernels::cpu;

namespace {

constexpr int64_t kLogitsChunkRows = 64;  // rows of logits computed per GEMM
constexpr int64_t kDecodeSizedRows = 16;  // calls this small run as many threads as the governor says
constexpr int64_t kLoadEveryCalls = 8;    // the machine's other load is read every 8 of them

// A method's view of the cache: float32 rows as stored, or f16/bf16 rows
// (bit-plane rows, at full precision) widened into a per-head copy made when the head is first read (forget()
// drops it after the head changed).
class SequenceKvView final : public BackendKvView {
 public:
  explicit SequenceKvView(const KvSequence& seq)
      : seq_(seq), half_(seq.pool().dtype() != kernels::DType::F32 || seq.pool().bit_planes().active()) {}
  int32_t page_size() const override { return seq_.pool().shape().page_size; }
  int32_t n_tokens(int32_t layer, int32_t kv_head) const override { return seq_.table(layer, kv_head).n_tokens(); }
  std::span<const int32_t> positions(int32_t layer, int32_t kv_head) const override {
    return seq_.table(layer, kv_head).positions;
  }
  const float* key(int32_t layer, int32_t kv_head, int32_t token) const override {
    if (!half_) return seq_.k_row(layer, kv_head, token);
    return widened(layer, kv_head).data() + int64_t(2 * token) * seq_.pool().shape().head_dim;
  }
  const float* value(int32_t layer, int32_t kv_head, int32_t token) const override {
    if (!half_) return seq_.v_row(layer, kv_head, token);
    return widened(layer, kv_head).data() + int64_t(2 * token + 1) * seq_.pool().shape().head_dim;
  }
  void forget(int32_t layer, int32_t kv_head) const override { rows_.erase({layer, kv_head}); }

 private:
  // (tokens, 2, head_dim): each stored token's K then V row as float.
  const std::vector<float>& widened(int32_t layer, int32_t kv_head) const {
    auto [it, fresh] = rows_.try_emplace({layer, kv_head});
    if (fresh) {
      const int32_t n = seq_.table(layer, kv_head).n_tokens();
      const int64_t hd = seq_.pool().shape().head_dim;
      const kernels::DType dtype = seq_.pool().dtype();
      const kernels::BitPlanes planes = seq_.pool().bit_planes();
      it->second.resize(size_t(2 * n * hd));
      for (int32_t i = 0; i < n; ++i) {
        float* k = it->second.data() + 2 * i * hd;
        if (planes.active()) {  // at full precision
          cpu::bit_plane_decode(seq_.k_bytes(layer, kv_head, i), hd, planes, true, k);
          cpu::bit_plane_decode(seq_.v_bytes(layer, kv_head, i), hd, planes, true, k + hd);
          continue;
        }
        cpu::widen_to_float(seq_.k_bytes(layer, kv_head, i), dtype, hd, k);
        cpu::widen_to_float(seq_.v_bytes(layer, kv_head, i), dtype, hd, k + hd);
      }
    }
    return it->second;
  }
  const KvSequence& seq_;
  bool half_;
  mutable std::map<std::pair<int32_t, int32_t>, std::vector<float>> rows_;
};

// The kernels' view of a file tensor; rows == 0 for a type they do not compute with.
cpu::QuantMatrixRef quant_ref(const FileTensor& t) {
  cpu::QuantMatrixRef ref;
  switch (gguf::TensorType(t.type)) {
    case gguf::TensorType::Q4_0: ref.type = cpu::QuantType::Q4_0; break;
    case gguf::TensorType::Q4_1: ref.type = cpu::QuantType::Q4_1; break;
    case gguf::TensorType::Q8_0: ref.type = cpu::QuantType::Q8_0; break;
    default: return ref;
  }
  if (t.empty() || t.cols % cpu::kQuantBlock != 0) return ref;
  ref.data = t.bytes.data();
  ref.rows = t.rows;
  ref.cols = t.cols;
  return ref;
}

}  // namespace

Result<std::unique_ptr<Backend>> make_cpu_backend(std::shared_ptr<const Model> model, const EngineOptions& options,
                                                  int32_t max_context) {
  if (!model->has_weights()) return Error{"cpu backend: the model has no weights"};
  return std::unique_ptr<Backend>(std::make_unique<CpuBackend>(std::move(model), options, max_context));
}

CpuBackend::CpuBackend(std::shared_ptr<const Model> model, const EngineOptions& options, int32_t max_context)
    : model_(std::move(model)),
      config_(model_->config()),
      time_attention_(options.time_attention),
      max_context_(max_context) {
  const ModelConfig& c = config_;
  // Chunks of at least 2 MiB, so that the host storage maps them in huge pages.
  const kernels::DType kv_dtype = options.kv_dtype == KvDType::F16    ? kernels::DType::F16
                                  : options.kv_dtype == KvDType::BF16 ? kernels::DType::BF16
                                                                      : kernels::DType::F32;
  const int64_t page_bytes = int64_t(options.page_size) * c.head_dim * 2 * kernels::dtype_bytes(kv_dtype);
  const auto pages_per_chunk = int32_t(std::max<int64_t>(256, (int64_t(kHugePageBytes) + page_bytes - 1) / page_bytes));
  pool_ = std::make_shared<KvPagePool>(KvCacheShape{c.n_layers, c.n_kv_heads, c.head_dim, options.page_size},
                                       pages_per_chunk, make_host_page_storage(kv_dtype));
  bound_sync_.assign(size_t(c.n_layers) * size_t(c.n_kv_heads), PageBoundSync{});
  overrides_.assign(size_t(kProjCount), std::vector<WeightVector>(size_t(std::max(1, c.n_layers))));
  adapters_.assign(size_t(kProjCount), std::vector<Adapter>(size_t(std::max(1, c.n_layers))));
  stored_.resize(size_t(kProjCount));
  transposed_.assign(size_t(kProjCount), std::vector<std::vector<float>>(size_t(std::max(1, c.n_layers))));
  for (auto& per_layer : stored_) per_layer.resize(size_t(std::max(1, c.n_layers)));
  if (options.n_threads > 0) omp_set_num_threads(options.n_threads);
  max_threads_ = omp_get_max_threads();
  governor_ = ThreadGovernor(max_threads_);
  file_weights_.assign(size_t(kProjCount), std::vector<cpu::QuantMatrixRef>(size_t(std::max(1, c.n_layers))));
  if (options.weights == WeightSource::File) {
    const ModelWeights& w = model_->weights();
    static constexpr std::pair<Proj, LayerTensor> kTensors[] = {
        {Proj::Q, LayerTensor::attn_q},        {Proj::K, LayerTensor::attn_k},       {Proj::V, LayerTensor::attn_v},
        {Proj::O, LayerTensor::attn_output},   {Proj::Gate, LayerTensor::ffn_gate},  {Proj::Up, LayerTensor::ffn_up},
        {Proj::Down, LayerTensor::ffn_down}};
    for (int32_t l = 0; l < c.n_layers; ++l)
      for (const auto& [p, t] : kTensors) file_weights_[size_t(p)][size_t(l)] = quant_ref(w.layers[size_t(l)].file[size_t(t)]);
    file_weights_[size_t(Proj::Output)][0] = quant_ref(w.lm_head_file());
  }
}

int64_t CpuBackend::weight_bytes() const {
  int64_t bytes = model_->parameter_count() * int64_t(sizeof(float));
  for (const auto& per_layer : file_weights_)
    for (const auto& q : per_layer) bytes += q.rows * q.row_bytes();
  for (const auto& per_layer : transposed_)
    for (const auto& t : per_layer) bytes += int64_t(t.size() * sizeof(float));
  return bytes;
}

Backend::StoredWeights CpuBackend::stored_weights() const {
  StoredWeights s;
  for (const auto& per_layer : stored_)
    for (const auto& t : per_layer)
      if (t != nullptr) s.bytes += t->bytes(), s.values += t->rows * t->cols;
  return s;
}

const cpu::QuantMatrixRef* CpuBackend::file_weight(Proj p, int32_t l) const {
  const size_t at = size_t(std::max(l, 0));
  const cpu::QuantMatrixRef& q = file_weights_[size_t(p)][at];
  if (q.rows == 0 || !overrides_[size_t(p)][at].empty() || stored_[size_t(p)][at] != nullptr) return nullptr;
  return &q;
}

Result<std::shared_ptr<KvPagePool>> CpuBackend::make_bit_plane_pool(kernels::BitPlanes planes) {
  return std::make_shared<KvPagePool>(pool_->shape(), pool_->pages_per_chunk(), make_host_bit_plane_storage(planes));
}

bool CpuBackend::supports(Feature feature) const {
  switch (feature) {
    case Feature::KvPagesF32: return pool_->format() == KvPageFormat::F32;
    case Feature::KvPagesF16: return pool_->format() == KvPageFormat::F16;
    case Feature::KvPagesBF16: return pool_->format() == KvPageFormat::BF16;
    case Feature::KvBitPlanes: return true;
    case Feature::Graphs:
      return false;
    default:
      return true;
  }
}

std::string CpuBackend::device_description() const { return "cpu: " + cpu_description(); }

std::unique_ptr<BackendKvView> CpuBackend::kv_view(const KvSequence& seq) const {
  return std::make_unique<SequenceKvView>(seq);
}

Status CpuBackend::begin_call(const CallSetup& call) {
  const ModelConfig& c = config_;
  if (focused_ >= 0)  // a call that failed inside a focus: the whole call's buffers come back first
    if (auto s = unfocus_segment(); !s) return s;
  const int64_t n = int64_t(call.tokens.size());
  tokens_.assign(call.tokens.begin(), call.tokens.end());
  n_ = n;
  call_rows_ = n;
  call_first_position_ = call.first_position;
  cache_positions_ = call.cache_positions;
  stats_layer_ = -1;
  sequence_retention_started_ = false;
  if (n > workspace_tokens_) {
    x_.resize(size_t(n * c.n_embd));
    xn_.resize(size_t(n * c.n_embd));
    q_.resize(size_t(n * c.q_dim()));
    k_.resize(size_t(n * c.kv_dim()));
    v_.resize(size_t(n * c.kv_dim()));
    attn_.resize(size_t(n * c.q_dim()));
    proj_.resize(size_t(n * c.n_embd));
    gate_.resize(size_t(n * c.n_ff));
    up_.resize(size_t(n * c.n_ff));
    workspace_tokens_ = n;
  }
  segments_.assign(call.segments.begin(), call.segments.end());
  focused_ = -1;
  x_row0_ = 0;
  stashed_.assign(segments_.size(), {});
  if (auto s = call_positions(call, positions_, "cpu"); !s) return s;
  governed_call_ = n <= kDecodeSizedRows && max_threads_ > 1;
  if (governed_call_ && governed_calls_++ % kLoadEveryCalls == 0) governor_.observe_load(other_load_.sample());
  omp_set_num_threads(governed_call_ ? governor_.next_call() : max_threads_);
  call_start_ = std::chrono::steady_clock::now();
  return ok_status();
}

Status CpuBackend::embed() {
  const int64_t e = config_.n_embd;
  const auto& table = model_->weights().token_embd;
  for (int64_t i = 0; i < n_; ++i)
    std::memcpy(&x_[size_t(i * e)], &table[size_t(int64_t(tokens_[size_t(i)]) * e)], size_t(e) * sizeof(float));
  return ok_status();
}

Status CpuBackend::rmsnorm(Norm norm, int32_t l) {
  const LayerWeights& lw = model_->weights().layers[size_t(l)];
  const auto& weight = norm == Norm::Attention ? lw.attn_norm : lw.ffn_norm;
  cpu::rmsnorm(xn_.data(), x_.data(), weight.data(), n_, config_.n_embd, config_.rms_eps);
  return ok_status();
}

const float* CpuBackend::weight(Proj p, int32_t l) const {
  const auto& own = overrides_[size_t(p)][size_t(std::max(l, 0))];
  if (!own.empty()) return own.data();
  const ModelWeights& w = model_->weights();
  if (p == Proj::Output) return w.lm_head();
  const LayerWeights& lw = w.layers[size_t(l)];
  switch (p) {
    case Proj::Q: return lw.wq.data();
    case Proj::K: return lw.wk.data();
    case Proj::V: return lw.wv.data();
    case Proj::O: return lw.wo.data();
    case Proj::Gate: return lw.w_gate.data();
    case Proj::Up: return lw.w_up.data();
    case Proj::Down: return lw.w_down.data();
    case Proj::Output: break;
  }
  return nullptr;
}

CpuBackend::LinearIo CpuBackend::linear_io(Proj p) {
  const ModelConfig& c = config_;
  switch (p) {
    case Proj::Q: return {xn_.data(), q_.data(), c.n_embd, c.q_dim()};
    case Proj::K: return {xn_.data(), k_.data(), c.n_embd, c.kv_dim()};
    case Proj::V: return {xn_.data(), v_.data(), c.n_embd, c.kv_dim()};
    case Proj::O: return {attn_.data(), proj_.data(), c.q_dim(), c.n_embd};
    case Proj::Gate: return {xn_.data(), gate_.data(), c.n_embd, c.n_ff};
    case Proj::Up: return {xn_.data(), up_.data(), c.n_embd, c.n_ff};
    case Proj::Down: return {gate_.data(), proj_.data(), c.n_ff, c.n_embd};
    case Proj::Output: break;
  }
  return {nullptr, nullptr, 0, 0};
}

// Decode-sized calls: the group's matrices in one parallel region (one
// quantization of the input for file weights), when every one of them is read
// the same way (all file blocks, or all float32 for one row); adapters after.
Status CpuBackend::linear_group(std::span<const Proj> projs, int32_t l) {
  const int64_t in = linear_io(projs[0]).in;
  bool all_file = true, all_f32 = n_ <= cpu::kGemvMaxRows;
  for (const Proj p : projs) {
    if (p == Proj::Output || linear_io(p).x != linear_io(projs[0]).x) return Backend::linear_group(projs, l);
    const bool stored = stored_[size_t(p)][size_t(l)] != nullptr, file = file_weight(p, l) != nullptr;
    all_file = all_file && file;
    all_f32 = all_f32 && !stored && !file;
  }
  if (all_file && n_ <= cpu::kQuantMatmulMaxIntegerRows) {
    std::vector<cpu::QuantTarget> targets;
    for (const Proj p : projs) targets.push_back({linear_io(p).y, *file_weight(p, l)});
    cpu::quant_matmul_group(targets.data(), int(targets.size()), xn_.data(), n_, quant_scratch_);
  } else if (all_f32) {
    std::vector<cpu::GemvTarget> targets;
    for (const Proj p : projs) targets.push_back({linear_io(p).y, weight(p, l), linear_io(p).out});
    cpu::gemv_group(targets.data(), int(targets.size()), xn_.data(), n_, in);
  } else {
    return Backend::linear_group(projs, l);
  }
  for (const Proj p : projs) {
    const LinearIo io = linear_io(p);
    if (auto s = apply_adapter(p, l, io.x, io.y, io.in, io.out); !s) return s;
  }
  return ok_status();
}

Status CpuBackend::linear(Proj p, int32_t l, const std::vector<int32_t>* rows) {
  if (p == Proj::Output) return Error{"cpu backend: the output projection runs inside the logits op"};
  const float* w = weight(p, l);
  const auto [x, y, in, out] = linear_io(p);
  const kernels::cpu::Quant4Tensor* stored = stored_[size_t(p)][size_t(l)].get();
  if (rows != nullptr) {  // a neuron subset of the FFN
    if (stored != nullptr)
      return Error{fmt::format("cpu backend: a neuron subset of {}, stored in 4 bits for this run", proj_name(p))};
    if (adapters_[size_t(p)][size_t(l)].rank > 0)
      return Error{fmt::format("cpu backend: an unmerged adapter on {} with a neuron subset (merge it)", proj_name(p))};
    const int64_t k = int64_t(rows->size());
    if (p == Proj::Down && n_ == 1)  // the selected rows of the transposed down weight: its selected columns
      cpu::gather_rows_gemv(y, x, transposed(Proj::Down, l).data(), rows->data(), k, out);
    else if (p == Proj::Down)
      cpu::matmul_x_rows(y, x, transposed(Proj::Down, l).data(), rows->data(), n_, k, out);
    else
      cpu::matmul_xwt_rows(y, x, w, rows->data(), n_, int64_t(rows->size()), in);
    return ok_status();
  }
  return linear_from(p, l, x);
}

Status CpuBackend::linear_from(Proj p, int32_t l, const float* x) {
  const auto [own_x, y, in, out] = linear_io(p);
  (void)own_x;
  if (const kernels::cpu::Quant4Tensor* stored = stored_[size_t(p)][size_t(l)].get())
    cpu::quant4_matmul_xwt(y, x, *stored, n_, dequant_scratch_);
  else if (const cpu::QuantMatrixRef* q = file_weight(p, l)) cpu::quant_matmul_xwt(y, x, *q, n_, quant_scratch_);
  else cpu::matmul_xwt(y, x, weight(p, l), n_, out, in);
  return apply_adapter(p, l, x, y, in, out);
}

// One row against float32 weights: the kept inputs' rows of the transposed
// weights only, every projection in one parallel region. Otherwise (more rows,
// 4-bit or the file's blocks) the sparsified input through the projection's own
// path: the same result, no saving.
Status CpuBackend::linear_sparse(std::span<const Proj> projs, int32_t l, std::span<const float> thresholds) {
  std::vector<cpu::SparseInputTarget> targets;
  std::vector<size_t> target_of;  // the index into projs of each target
  for (size_t i = 0; i < projs.size(); ++i) {
    const Proj p = projs[i];
    if (p == Proj::Output) return Error{"cpu backend: the output projection has no activation sparsity"};
    const auto [x, y, in, out] = linear_io(p);
    if (n_ == 1 && stored_[size_t(p)][size_t(l)] == nullptr && file_weight(p, l) == nullptr) {
      targets.push_back({y, transposed(p, l).data(), out, thresholds[i]});
      target_of.push_back(i);
      continue;
    }
    sparse_x_.resize(size_t(n_ * in));
    sparsity_zeros_[size_t(p)] += cpu::sparsify(sparse_x_.data(), x, n_ * in, thresholds[i]);
    if (auto s = linear_from(p, l, sparse_x_.data()); !s) return s;
  }
  if (targets.empty()) return ok_status();
  const float* x = linear_io(projs[0]).x;  // the projections share their input
  const int64_t in = linear_io(projs[0]).in;
  cpu::sparse_input_gemv_group(targets.data(), int(targets.size()), x, in);
  for (size_t t = 0; t < targets.size(); ++t) {
    const size_t i = target_of[t];
    const Proj p = projs[i];
    sparsity_zeros_[size_t(p)] += targets[t].zeros;
    if (adapters_[size_t(p)][size_t(l)].rank == 0) continue;
    sparse_x_.resize(size_t(in));
    cpu::sparsify(sparse_x_.data(), x, in, thresholds[i]);
    if (auto s = apply_adapter(p, l, sparse_x_.data(), targets[t].y, in, targets[t].out); !s) return s;
  }
  return ok_status();
}

// CATS: one row computes up only for the neurons the gate keeps (rows of the
// up weight, as stored); more rows (or another storage of up) compute up
// densely and zero the others.
Status CpuBackend::gated_swiglu(int32_t l, float threshold) {
  const ModelConfig& c = config_;
  const size_t up = size_t(Proj::Up);
  if (n_ == 1 && stored_[up][size_t(l)] == nullptr && file_weight(Proj::Up, l) == nullptr &&
      adapters_[up][size_t(l)].rank == 0) {
    sparsity_zeros_[up] += cpu::gated_silu_up(gate_.data(), gate_.data(), xn_.data(), weight(Proj::Up, l), c.n_ff,
                                              c.n_embd, threshold);
    return ok_status();
  }
  if (auto s = linear(Proj::Up, l, nullptr); !s) return s;
  sparsity_zeros_[up] += cpu::gated_silu_mul(gate_.data(), gate_.data(), up_.data(), n_ * c.n_ff, threshold);
  return ok_status();
}

// Q: each kept head's rows of W_q into its own columns of q; O: the kept
// heads' attention columns against their rows of the transposed W_o. Another
// storage of the weight (4-bit, the file's blocks) or an adapter: the whole
// projection (a masked head's query is not read, its output is zero), no saving.
Status CpuBackend::linear_heads(Proj p, int32_t l, std::span<const int32_t> heads) {
  const ModelConfig& c = config_;
  const int64_t hd = c.head_dim, qd = c.q_dim(), e = c.n_embd;
  if (p != Proj::Q && p != Proj::O) return Error{fmt::format("cpu backend: {} has no heads", proj_name(p))};
  if (stored_[size_t(p)][size_t(l)] != nullptr || file_weight(p, l) != nullptr || adapters_[size_t(p)][size_t(l)].rank > 0)
    return linear(p, l, nullptr);
  head_rows_.clear();
  for (const int32_t h : heads)
    for (int64_t d = 0; d < hd; ++d) head_rows_.push_back(int32_t(h * hd + d));
  const int64_t k = int64_t(head_rows_.size());
  head_scratch_.resize(size_t(n_ * k));
  if (p == Proj::Q) {
    cpu::matmul_xwt_rows(head_scratch_.data(), xn_.data(), weight(p, l), head_rows_.data(), n_, k, e);
    for (int64_t r = 0; r < n_; ++r)
      for (int64_t i = 0; i < k; ++i) q_[size_t(r * qd + head_rows_[size_t(i)])] = head_scratch_[size_t(r * k + i)];
    return ok_status();
  }
  for (int64_t r = 0; r < n_; ++r)
    for (int64_t i = 0; i < k; ++i) head_scratch_[size_t(r * k + i)] = attn_[size_t(r * qd + head_rows_[size_t(i)])];
  if (k == 0) {
    std::fill(proj_.begin(), proj_.begin() + n_ * e, 0.0f);
    return ok_status();
  }
  const float* o_t = transposed(Proj::O, l).data();
  if (n_ == 1) cpu::gather_rows_gemv(proj_.data(), head_scratch_.data(), o_t, head_rows_.data(), k, e);
  else cpu::matmul_x_rows(proj_.data(), head_scratch_.data(), o_t, head_rows_.data(), n_, k, e);
  return ok_status();
}

Status CpuBackend::keep_top_neurons(int32_t k) {
  cpu::keep_top_k_magnitudes(gate_.data(), n_, config_.n_ff, k);  // swiglu wrote the activation over gate
  return ok_status();
}

Status CpuBackend::keep_top_heads(int32_t k, std::span<const uint8_t> computed) {
  cpu::keep_top_heads(attn_.data(), n_, config_.n_heads, config_.head_dim, k, computed.data());
  return ok_status();
}

Status CpuBackend::prepare_sparsity(const ActivationSparsity& sparsity) {
  for (int32_t p = 0; p < kSparseProjections; ++p)
    for (int32_t l = 0; l < config_.n_layers; ++l) {
      if (reads_transposed(sparsity, l, Proj(p))) transposed(Proj(p), l);
      else if (Proj(p) != Proj::Down && Proj(p) != Proj::O) transposed_[size_t(p)][size_t(l)] = {};  // masks read these
    }
  sparsity_zeros_.fill(0);
  return ok_status();
}

Status CpuBackend::read_sparsity(std::array<int64_t, kSparseProjections>& zeros) {
  zeros = sparsity_zeros_;
  sparsity_zeros_.fill(0);
  return ok_status();
}

// y += (x A^T) B^T: the unmerged adapters of (p, l), scales folded into B.
Status CpuBackend::apply_adapter(Proj p, int32_t l, const float* x, float* y, int64_t in, int64_t out) {
  const Adapter& ad = adapters_[size_t(p)][size_t(l)];
  if (ad.rank == 0) return ok_status();
  adapter_tmp_.resize(size_t(n_ * ad.rank));
  cpu::matmul_xwt(adapter_tmp_.data(), x, ad.a.data(), n_, ad.rank, in);
  cpu::matmul_xwt_add(y, adapter_tmp_.data(), ad.b.data(), n_, out, ad.rank);
  return ok_status();
}

const std::vector<float>& CpuBackend::transposed(Proj p, int32_t l) {
  std::vector<float>& t = transposed_[size_t(p)][size_t(l)];
  if (t.empty()) {
    const auto shape = proj_shape(config_, p);  // (out, in); not a structured binding: OpenMP captures it
    const int64_t out = shape.first, in = shape.second;
    const float* w = weight(p, l);
    t.resize(size_t(out * in));
#pragma omp parallel for if (out * in >= (1 << 18))
    for (int64_t i = 0; i < in; ++i)
      for (int64_t o = 0; o < out; ++o) t[size_t(i * out + o)] = w[size_t(o * in + i)];
  }
  return t;
}

Status CpuBackend::swiglu(int64_t cols) {
  cpu::silu_mul(gate_.data(), up_.data(), n_, cols);
  return ok_status();
}

Status CpuBackend::add_residual() {
  cpu::add_inplace(x_.data(), proj_.data(), n_, config_.n_embd);
  return ok_status();
}

Status CpuBackend::add_bias(Proj p, int32_t l) {
  const LayerWeights& lw = model_->weights().layers[size_t(l)];
  const WeightVector* bias = p == Proj::Q ? &lw.bq : p == Proj::K ? &lw.bk : p == Proj::V ? &lw.bv
                             : p == Proj::O ? &lw.bo : nullptr;
  if (bias == nullptr) return Error{fmt::format("cpu backend: {} has no bias", proj_name(p))};
  if (bias->empty()) return ok_status();
  float* y = p == Proj::Q ? q_.data() : p == Proj::K ? k_.data() : p == Proj::V ? v_.data() : proj_.data();
  cpu::add_row_bias(y, bias->data(), n_, proj_shape(config_, p).first);
  return ok_status();
}

Status CpuBackend::rope(const KvSequence& seq, int32_t l, bool queries) {
  const ModelConfig& c = config_;
  if (!cache_positions_) {
    if (queries)
      cpu::rope(q_.data(), n_, c.n_heads, c.head_dim, c.rope_dim, positions_.data(), c.rope_theta, c.rope_neox, c.rope());
    cpu::rope(k_.data(), n_, c.n_kv_heads, c.head_dim, c.rope_dim, positions_.data(), c.rope_theta, c.rope_neox, c.rope());
    return ok_status();
  }
  // Each kv head's new tokens continue its own stored count.
  const int64_t hd = c.head_dim, gs = c.group_size(), n = n_;
  group_positions_.resize(size_t(c.n_kv_heads * n));
  for (int32_t g = 0; g < c.n_kv_heads; ++g) {
    int32_t* pos = &group_positions_[size_t(g * n)];
    for (int64_t i = 0; i < n; ++i) pos[i] = seq.table(l, g).n_tokens() + int32_t(i);
    cpu::rope_strided(&k_[size_t(g * hd)], n, c.kv_dim(), 1, hd, c.rope_dim, pos, c.rope_theta, c.rope_neox, c.rope());
    if (queries)
      cpu::rope_strided(&q_[size_t(g * gs * hd)], n, c.q_dim(), gs, hd, c.rope_dim, pos, c.rope_theta, c.rope_neox, c.rope());
  }
  return ok_status();
}

int32_t CpuBackend::rotary_position(int32_t g, int64_t i) const {
  return cache_positions_ ? group_positions_[size_t(g * n_ + i)] : positions_[size_t(i)];
}

Status CpuBackend::append_kv(KvSequence& seq, int32_t l) {
  const ModelConfig& c = config_;
  const int64_t hd = c.head_dim;
  const int32_t ps = seq.pool().shape().page_size;
  for (int32_t g = 0; g < c.n_kv_heads; ++g)
    for (int64_t i = 0; i < n_; ++i) {
      seq.append(l, g, &k_[size_t(i * c.kv_dim() + g * hd)], &v_[size_t(i * c.kv_dim() + g * hd)],
                 positions_[size_t(i)], rotary_position(g, i));
      // A new token has no retention score yet (read after the append: the pool may have grown).
      const HeadPageTable& t = seq.table(l, g);
      seq.pool().plane(SlotPlane::Score)[int64_t(t.pages.back()) * ps + (t.n_tokens() - 1) % ps] = 0.0f;
    }
  return ok_status();
}

Status CpuBackend::read_hidden(int64_t row_from, std::vector<float>& out) {
  out.assign(x_.begin() + row_from * config_.n_embd, x_.begin() + n_ * config_.n_embd);
  return ok_status();
}

Status CpuBackend::write_hidden(std::span<const float> rows) {
  if (int64_t(rows.size()) != n_ * config_.n_embd)
    return Error{fmt::format("cpu backend: {} hidden values for a call of {} rows", rows.size(), n_)};
  std::copy(rows.begin(), rows.end(), x_.begin());
  return ok_status();
}

Status CpuBackend::read_last_queries(std::vector<float>& out) {
  out.assign(q_.begin() + (n_ - 1) * config_.q_dim(), q_.begin() + n_ * config_.q_dim());
  return ok_status();
}

Status CpuBackend::read_tap(Tap tap, std::vector<float>& out) {
  const ModelConfig& c = config_;
  auto take = [&](const std::vector<float>& from, int64_t cols) { out.assign(from.begin(), from.begin() + n_ * cols); };
  switch (tap) {
    case Tap::HiddenIn:
    case Tap::HiddenOut: take(x_, c.n_embd); break;
    case Tap::Queries: take(q_, c.q_dim()); break;
    case Tap::Keys: take(k_, c.kv_dim()); break;
    case Tap::AttentionOut: take(attn_, c.q_dim()); break;
    case Tap::FfnActivation: take(gate_, c.n_ff); break;  // swiglu wrote it over gate
    case Tap::Values: take(v_, c.kv_dim()); break;
    case Tap::AttentionIn:
    case Tap::FfnIn: take(xn_, c.n_embd); break;
    case Tap::FfnGate: take(gate_, c.n_ff); break;  // before swiglu writes the activation over it
  }
  return ok_status();
}

Result<int32_t> CpuBackend::evict(KvSequence& seq, int32_t l, int32_t g, std::vector<int32_t> drop) {
  return seq.evict(l, g, std::move(drop));
}

Status CpuBackend::rerotate(KvSequence& seq, int32_t l, int32_t g) {
  if (pool_->dtype() != kernels::DType::F32) return rerotate_from_originals(seq, l, g);
  // RoPE rotations compose: turning a key by (new - old) positions equals
  // rotating the unrotated key at its new position. Eviction shifts runs of
  // tokens by the same amount: rotate each run (within a page, where rows are
  // contiguous) with one set of angles.
  const ModelConfig& c = config_;
  HeadPageTable& t = seq.table(l, g);
  const int32_t ps = pool_->shape().page_size;
  for (int32_t i = 0; i < t.n_tokens();) {
    const int32_t delta = i - t.rotary[size_t(i)];
    int32_t end = i + 1;
    while (end < t.n_tokens() && end % ps != 0 && end - t.rotary[size_t(end)] == delta) ++end;
    if (delta != 0) {
      cpu::rope_shift(seq.k_row_mutable(l, g, i), end - i, c.head_dim, c.head_dim, c.rope_dim, delta, c.rope_theta,
                      c.rope_neox, c.rope());
      for (int32_t j = i; j < end; ++j) t.rotary[size_t(j)] = j;
    }
    i = end;
  }
  return ok_status();
}

void CpuBackend::swap_call_rows() {
  std::swap(q_, call_.q);
  std::swap(k_, call_.k);
  std::swap(v_, call_.v);
  std::swap(attn_, call_.attn);
  std::swap(positions_, call_.positions);
  std::swap(tokens_, call_.tokens);
}

// A segment's rows become the call as the per-sequence ops see it: the
// whole call's buffers step aside (swapped, not copied) and the segment's
// rows are copied into the workspace members; unfocus puts them back.
Status CpuBackend::focus_segment(int32_t segment) {
  if (focused_ >= 0 || segment < 0 || segment >= int32_t(segments_.size()))
    return Error{fmt::format("cpu backend: segment {} of a call with {} cannot be focused{}", segment, segments_.size(),
                             focused_ >= 0 ? " (another is)" : "")};
  const CallSegment& seg = segments_[size_t(segment)];
  const ModelConfig& c = config_;
  const int64_t r0 = seg.row_from, rows = seg.rows, qd = c.q_dim(), kd = c.kv_dim();
  swap_call_rows();
  call_.n = n_;
  q_.assign(call_.q.begin() + r0 * qd, call_.q.begin() + (r0 + rows) * qd);
  k_.assign(call_.k.begin() + r0 * kd, call_.k.begin() + (r0 + rows) * kd);
  v_.assign(call_.v.begin() + r0 * kd, call_.v.begin() + (r0 + rows) * kd);
  attn_.assign(size_t(rows * qd), 0.0f);
  positions_.assign(call_.positions.begin() + r0, call_.positions.begin() + r0 + rows);
  tokens_.assign(call_.tokens.begin() + r0, call_.tokens.begin() + r0 + rows);
  n_ = rows;
  call_rows_ = rows;
  call_first_position_ = seg.first_position;
  sequence_retention_started_ = false;
  stats_layer_ = -1;
  focused_ = segment;
  x_row0_ = r0;
  return ok_status();
}

Status CpuBackend::unfocus_segment() {
  if (focused_ < 0) return Error{"cpu backend: no segment is focused"};
  const CallSegment& seg = segments_[size_t(focused_)];
  const ModelConfig& c = config_;
  const int64_t r0 = seg.row_from, qd = c.q_dim(), kd = c.kv_dim();
  // The rotated queries and keys and the attention output go back to the call's rows.
  std::copy(q_.begin(), q_.begin() + seg.rows * qd, call_.q.begin() + r0 * qd);
  std::copy(k_.begin(), k_.begin() + seg.rows * kd, call_.k.begin() + r0 * kd);
  std::copy(attn_.begin(), attn_.begin() + seg.rows * qd, call_.attn.begin() + r0 * qd);
  swap_call_rows();
  n_ = call_.n;
  call_rows_ = n_;
  call_first_position_ = segments_.front().first_position;
  focused_ = -1;
  x_row0_ = 0;
  return ok_status();
}

Status CpuBackend::stash_segment(bool restore) {
  if (focused_ < 0) return Error{"cpu backend: no segment is focused to stash"};
  const int64_t d = config_.n_embd;
  float* rows = x_.data() + x_row0_ * d;
  std::vector<float>& kept = stashed_[size_t(focused_)];
  if (!restore) {
    kept.assign(rows, rows + n_ * d);
    return ok_status();
  }
  if (int64_t(kept.size()) != n_ * d) return Error{fmt::format("cpu backend: segment {} has nothing stashed", focused_)};
  std::copy(kept.begin(), kept.end(), rows);
  return ok_status();
}

Status CpuBackend::keep_rows(std::span<const int32_t> rows) {
  const int64_t d = config_.n_embd;
  if (cache_positions_) return Error{"cpu backend: rows leave a call only with original positions"};
  for (size_t j = 0; j < rows.size(); ++j) {  // ascending: row j moves down from rows[j] >= j
    const auto i = size_t(rows[j]);
    if (i == j) continue;
    std::copy_n(&x_[i * size_t(d)], d, &x_[j * size_t(d)]);
    positions_[j] = positions_[i];
    tokens_[j] = tokens_[i];
  }
  n_ = int64_t(rows.size());
  tokens_.resize(rows.size());
  return ok_status();
}

// f16/bf16 pages: a key moved to index i is its original (the row as first
// written, saved in an origin page at its first move) turned by i - origin,
// rounded once however often it moves, as the CUDA backend does
// (cpu::kv_rope_from_originals is its kernel's twin).
Status CpuBackend::rerotate_from_originals(KvSequence& seq, int32_t l, int32_t g) {
  const ModelConfig& c = config_;
  const std::vector<int32_t> moved = seq.rerotation_moves(l, g);  // (5, n)
  if (moved.empty()) return ok_status();
  const int32_t n = int32_t(moved.size() / 5);
  const int32_t* d = moved.data();
  const kernels::KvPages kv{pool_->chunks().data(), pool_->pages_per_chunk(), pool_->shape().page_size,
                            int32_t(c.head_dim), pool_->dtype()};
  cpu::kv_rope_from_originals(kv, d, d + n, d + 2 * n, d + 3 * n, d + 4 * n, n, int32_t(c.rope_dim), c.rope_theta,
                              c.rope_neox, c.rope());
  return ok_status();
}

Status CpuBackend::logits(int64_t from, int64_t n_rows, const LogitsSink& sink) {
  const ModelConfig& c = config_;
  const ModelWeights& w = model_->weights();
  if (n_rows <= 0 || !sink) return ok_status();
  cpu::rmsnorm(xn_.data(), x_.data() + from * c.n_embd, w.output_norm.data(), n_rows, c.n_embd, c.rms_eps);
  const int64_t chunk = std::min(n_rows, kLogitsChunkRows);
  logits_.resize(size_t(chunk * c.n_vocab));
  for (int64_t r0 = 0; r0 < n_rows; r0 += chunk) {
    const int64_t rows = std::min(chunk, n_rows - r0);
    output_head(xn_.data() + r0 * c.n_embd, rows, logits_.data());
    for (int64_t r = 0; r < rows; ++r)
      sink(from + r0 + r, std::span<const float>(logits_.data() + r * c.n_vocab, size_t(c.n_vocab)));
  }
  return ok_status();
}

void CpuBackend::output_head(const float* xn, int64_t rows, float* out) {
  const ModelConfig& c = config_;
  if (const cpu::QuantMatrixRef* q = file_weight(Proj::Output, -1))
    cpu::quant_matmul_xwt(out, xn, *q, rows, quant_scratch_);
  else
    cpu::matmul_xwt(out, xn, weight(Proj::Output, -1), rows, c.n_vocab, c.n_embd);
}

Status CpuBackend::end_call(double& attention_seconds) {
  if (governed_call_)
    governor_.record(std::chrono::duration<double>(std::chrono::steady_clock::now() - call_start_).count());
  attention_seconds = attention_seconds_;
  attention_seconds_ = 0;
  return ok_status();
}

Status CpuBackend::truncate(KvSequence& seq, int32_t n) {
  seq.truncate(n);
  return ok_status();
}

Status CpuBackend::set_weight_adapter(Proj p, int32_t l, int32_t rank, std::span<const float> a,
                                      std::span<const float> b) {
  if (p == Proj::Output) return Error{"cpu backend: no unmerged adapter on the output projection"};
  adapters_[size_t(p)][size_t(l)] = Adapter{rank, {a.begin(), a.end()}, {b.begin(), b.end()}};
  return ok_status();
}

Status CpuBackend::set_weight_storage(Proj p, int32_t l, const WeightStorage& storage, std::span<const float> weight) {
  auto& slot = stored_[size_t(p)][size_t(std::max(l, 0))];
  if (storage.format == WeightFormat::Model) {
    slot.reset();
    return ok_status();
  }
  const auto [out, in] = proj_shape(config_, p);
  if (int64_t(weight.size()) != out * in)
    return Error{fmt::format("cpu backend: {} has {} values to quantize, not {} x {}", proj_name(p), weight.size(), out, in)};
  slot = std::make_unique<cpu::Quant4Tensor>(cpu::quant4_quantize(weight.data(), out, in, quant4_format(storage.format),
                                                                  storage.block_size, storage.double_quant));
  return ok_status();
}

Status CpuBackend::set_weight_override(Proj p, int32_t l, std::span<const float> data) {
  WeightVector& slot = overrides_[size_t(p)][size_t(std::max(l, 0))];
  slot = WeightVector();
  const bool none_left = std::all_of(overrides_.begin(), overrides_.end(), [](const auto& per_layer) {
    return std::all_of(per_layer.begin(), per_layer.end(), [](const WeightVector& w) { return w.empty(); });
  });
  if (none_left) override_arena_.reset();  // every replaced weight gone: its memory too
  if (!data.empty()) {
    if (!override_arena_) override_arena_ = std::make_shared<WeightArena>();
    slot = WeightVector(data.begin(), data.end(), WeightAllocator<float>(override_arena_));
  }
  if (p != Proj::Output) transposed_[size_t(p)][size_t(l)] = {};  // transposed again when needed
  return ok_status();
}

}  // namespace inferlab
