#include "engine/cuda/cuda_engine.h"

#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <map>
#include <optional>
#include <stdexcept>
#include <tuple>

#include "cpu/half_convert.h"
#include "cuda/activation.cuh"
#include "cuda/attention.cuh"
#include "cuda/device_info.cuh"
#include "cuda/embedding.cuh"
#include "cuda/gemm.cuh"
#include "cuda/init.cuh"
#include "cuda/kv_cache_ops.cuh"
#include "cuda/page_bounds.cuh"
#include "cuda/rmsnorm.cuh"
#include "cuda/rope.cuh"
#include "engine/cuda/cuda_kv_storage.h"

namespace inferlab {

namespace kc = kernels::cuda;
using kernels::DType;

namespace {

constexpr int64_t kLogitsChunkRows = 64;       // rows of logits per LM-head GEMM
constexpr int64_t kMinWorkspaceRows = 64;      // so short calls never reallocate (CUDA graphs keep addresses)
constexpr size_t kCublasWorkspaceBytes = 32u << 20;
constexpr int32_t kMinGraphKeys = 1024;        // smallest key bound a decode graph is captured for

Error cuda_error(cudaError_t err, const std::string& what) {
  cudaGetLastError();  // clear a non-sticky error so the next call starts clean
  return Error{fmt::format("cuda: {}: {}", what, cudaGetErrorString(err))};
}

#define CUDA_TRY(expr, what)                                        \
  do {                                                              \
    if (const cudaError_t err_ = (expr); err_ != cudaSuccess)       \
      return cuda_error(err_, what);                                \
  } while (0)

DType kernel_dtype(GpuDType t) { return t == GpuDType::BF16 ? DType::BF16 : DType::F16; }

// The plugin SDK's read-only view of a sequence whose rows live on the GPU:
// positions come from the host page tables; a page's rows are downloaded (as
// float) the first time a method reads one of its tokens, so a method that
// reads only new keys each step (Quest's page bounds) copies one page per
// (layer, kv head). Policies that read many keys every step belong in an
// engine mechanism on the GPU.
class DeviceKvView final : public KvView {
 public:
  DeviceKvView(const KvSequence& seq, cudaStream_t stream) : seq_(seq), stream_(stream) {}
  int32_t page_size() const override { return seq_.pool().shape().page_size; }
  int32_t n_tokens(int32_t layer, int32_t kv_head) const override { return seq_.table(layer, kv_head).n_tokens(); }
  std::span<const int32_t> positions(int32_t layer, int32_t kv_head) const override {
    return seq_.table(layer, kv_head).positions;
  }
  const float* key(int32_t layer, int32_t kv_head, int32_t token) const override {
    return row(layer, kv_head, token, false);
  }
  const float* value(int32_t layer, int32_t kv_head, int32_t token) const override {
    return row(layer, kv_head, token, true);
  }
  // The rows of (layer, kv head) changed (eviction): the next read downloads them again.
  void forget(int32_t layer, int32_t kv_head) const {
    std::erase_if(cache_, [&](const auto& entry) {
      return std::get<0>(entry.first) == layer && std::get<1>(entry.first) == kv_head;
    });
  }

 private:
  using PageKey = std::tuple<int32_t, int32_t, int32_t>;  // layer, kv head, logical page
  const float* row(int32_t layer, int32_t kv_head, int32_t token, bool value) const {
    const KvPagePool& pool = seq_.pool();
    const int32_t ps = pool.shape().page_size, hd = pool.shape().head_dim;
    auto [it, fresh] = cache_.try_emplace(PageKey{layer, kv_head, token / ps});
    if (fresh) load(seq_.table(layer, kv_head).pages[size_t(token / ps)], it->second);
    return it->second.data() + (int64_t(value) * ps + token % ps) * hd;
  }
  // (2, page_size, head_dim) floats: K rows then V rows of one page.
  void load(int32_t page, std::vector<float>& out) const {
    const KvPagePool& pool = seq_.pool();
    const DType dtype = cuda_kv_pages(pool).dtype;
    const size_t elems = size_t(pool.page_bytes()) / 2;
    std::vector<uint16_t> raw(elems);
    // The page may still be being written: the copy queues behind that work.
    cudaError_t err =
        cudaMemcpyAsync(raw.data(), pool.page_data(page), size_t(pool.page_bytes()), cudaMemcpyDeviceToHost, stream_);
    if (err == cudaSuccess) err = cudaStreamSynchronize(stream_);
    if (err != cudaSuccess) throw std::runtime_error(std::string("KV view: ") + cudaGetErrorString(err));
    out.resize(elems);
    for (size_t i = 0; i < elems; ++i)
      out[i] = dtype == DType::BF16 ? kernels::cpu::bf16_to_float(raw[i]) : kernels::cpu::f16_to_float(raw[i]);
  }
  const KvSequence& seq_;
  cudaStream_t stream_;
  mutable std::map<PageKey, std::vector<float>> cache_;
};

// A CSR list (indptr, items) and a byte per head, as the attention kernels read them.
struct DeviceCsr {
  const int32_t* indptr;
  const int32_t* items;
  const uint8_t* flags;
};

// Copies the three into `buffer` (indptr, items, flags) and waits: the host
// vectors are the caller's and may go out of scope.
Result<DeviceCsr> upload_csr(DeviceMemory& buffer, const std::vector<int32_t>& indptr,
                             const std::vector<int32_t>& items, const std::vector<uint8_t>& flags,
                             cudaStream_t stream, const char* what) {
  const size_t indptr_bytes = indptr.size() * 4, items_bytes = items.size() * 4;
  if (!buffer.reserve(indptr_bytes + items_bytes + flags.size()))
    return Error{fmt::format("cuda engine: out of GPU memory for a {}", what)};
  char* base = buffer.as<char>();
  CUDA_TRY(cudaMemcpyAsync(base, indptr.data(), indptr_bytes, cudaMemcpyHostToDevice, stream), what);
  if (items_bytes > 0)
    CUDA_TRY(cudaMemcpyAsync(base + indptr_bytes, items.data(), items_bytes, cudaMemcpyHostToDevice, stream), what);
  CUDA_TRY(cudaMemcpyAsync(base + indptr_bytes + items_bytes, flags.data(), flags.size(), cudaMemcpyHostToDevice,
                           stream),
           what);
  CUDA_TRY(cudaStreamSynchronize(stream), what);
  return DeviceCsr{reinterpret_cast<const int32_t*>(base), reinterpret_cast<const int32_t*>(base + indptr_bytes),
                   reinterpret_cast<const uint8_t*>(base + indptr_bytes + items_bytes)};
}

}  // namespace

CudaEngine::CudaEngine(std::shared_ptr<const Model> model, EngineOptions options)
    : Engine(std::move(model), options), dtype_(kernel_dtype(options.gpu_dtype)) {}

CudaEngine::~CudaEngine() {
  if (stream_ != nullptr) cudaStreamSynchronize(stream_);
  pool_.reset();  // its pages before the stream they are copied on
  if (graph_ != nullptr) cudaGraphExecDestroy(graph_);
  for (cudaEvent_t e : events_) cudaEventDestroy(e);
  if (cublas_ != nullptr) cublasDestroy(cublas_);
  // stream_owner_ destroys the stream once no pool's storage holds it either.
}

Result<std::unique_ptr<CudaEngine>> CudaEngine::create(std::shared_ptr<const Model> model, EngineOptions options) {
  if (!model->has_weights()) return Error{"cuda engine: the model has no weights (use create_random)"};
  std::unique_ptr<CudaEngine> engine(new CudaEngine(std::move(model), options));
  if (auto s = engine->init_device(); !s) return s.error();
  if (auto s = engine->upload_weights(); !s) return s.error();
  return engine;
}

Result<std::unique_ptr<CudaEngine>> CudaEngine::create_random(const ModelConfig& config, uint64_t seed,
                                                              EngineOptions options) {
  auto model = Model::shape_only(config, fmt::format("random:{}:seed{}", config.name, seed));
  std::unique_ptr<CudaEngine> engine(new CudaEngine(std::move(model), options));
  if (auto s = engine->init_device(); !s) return s.error();
  if (auto s = engine->random_weights(seed); !s) return s.error();
  return engine;
}

Status CudaEngine::init_device() {
  const ModelConfig& c = config();
  const int devices = kc::device_count();
  if (devices == 0) return Error{"cuda engine: no CUDA GPU is visible on this machine"};
  if (c.head_dim != 64 && c.head_dim != 128)
    return Error{fmt::format("cuda engine: head_dim {} is not supported by the attention kernels (64, 128)",
                             c.head_dim)};
  if (options_.device < 0 || options_.device >= devices)
    return Error{fmt::format("cuda engine: device {} does not exist ({} visible)", options_.device, devices)};
  CUDA_TRY(cudaSetDevice(options_.device), "select device");
  CUDA_TRY(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking), "create stream");
  stream_owner_.reset(stream_, [](cudaStream_t stream) { cudaStreamDestroy(stream); });
  if (cublasCreate(&cublas_) != CUBLAS_STATUS_SUCCESS) return Error{"cuda engine: cuBLAS initialisation failed"};
  cublasSetStream(cublas_, stream_);
  // A fixed cuBLAS workspace: GEMMs then allocate nothing, so they can be captured in a graph.
  if (!cublas_workspace_.reserve(kCublasWorkspaceBytes)) return Error{"cuda engine: out of GPU memory"};
  cublasSetWorkspace(cublas_, cublas_workspace_.as(), kCublasWorkspaceBytes);
  device_name_ = kc::device_description(options_.device);

  try {  // the storage allocates its chunk table; create() returns errors, never throws
    // Chunks of about 32 MiB: a 7B model's 32K-token cache is then ~500 cudaMalloc
    // calls, not ~8000 (each also re-uploads the chunk table).
    const int64_t page_bytes = 2 * int64_t(options_.page_size) * c.head_dim * kernels::dtype_bytes(dtype_);
    const int32_t pages_per_chunk = int32_t(std::max<int64_t>(256, (int64_t(32) << 20) / page_bytes));
    pool_ = std::make_shared<KvPagePool>(KvCacheShape{c.n_layers, c.n_kv_heads, c.head_dim, options_.page_size},
                                         pages_per_chunk, make_cuda_page_storage(dtype_, stream_owner_));
  } catch (const std::bad_alloc&) {
    return Error{"cuda engine: out of GPU memory for the KV pool"};
  }
  max_pages_ = (max_context_ + options_.page_size - 1) / options_.page_size;
  const size_t tables = size_t(c.n_layers) * size_t(c.n_kv_heads);
  table_sync_.assign(tables, TableSync{});
  bound_sync_.assign(tables, PageBoundSync{});
  if (!tables_.reserve(tables * size_t(max_pages_) * 4) || !host_tables_.reserve(tables * size_t(max_pages_) * 4) ||
      !n_cached_.reserve(tables * 4) || !host_n_cached_.reserve(tables * 4) || !head_active_.reserve(size_t(c.n_heads)) ||
      !key_mass_.reserve(size_t(c.n_kv_heads) * size_t(max_context_) * 4) ||
      !head_norms_.reserve(size_t(c.n_heads) * 4))
    return Error{"cuda engine: out of GPU memory for the page tables"};
  return ensure_workspace(kMinWorkspaceRows);
}

void* CudaEngine::weight_alloc(int64_t elems, DType dtype) {
  weight_buffers_.emplace_back();
  const size_t bytes = size_t(elems) * size_t(kernels::dtype_bytes(dtype));
  if (!weight_buffers_.back().reserve(bytes)) return nullptr;
  weight_bytes_ += int64_t(bytes);
  return weight_buffers_.back().as();
}

Status CudaEngine::upload_weights() {
  const ModelConfig& c = config();
  const ModelWeights& w = model_->weights();
  DeviceMemory staging;
  // One float32 tensor through a staging buffer, converted to the GPU type.
  auto matrix = [&](const std::vector<float>& host, const void*& out) -> Status {
    void* dst = weight_alloc(int64_t(host.size()), dtype_);
    if (dst == nullptr || !staging.reserve(host.size() * 4)) return Error{"cuda engine: out of GPU memory for weights"};
    CUDA_TRY(cudaMemcpyAsync(staging.as(), host.data(), host.size() * 4, cudaMemcpyHostToDevice, stream_), "upload");
    CUDA_TRY(kc::convert_from_float(staging.as<float>(), int64_t(host.size()), dst, dtype_, stream_), "convert");
    CUDA_TRY(cudaStreamSynchronize(stream_), "upload");
    out = dst;
    return ok_status();
  };
  auto vector = [&](const std::vector<float>& host, const float*& out) -> Status {
    void* dst = weight_alloc(int64_t(host.size()), DType::F32);
    if (dst == nullptr) return Error{"cuda engine: out of GPU memory for weights"};
    // On our non-blocking stream: a legacy-stream cudaMemcpy from pageable memory may
    // return before the data lands, and our stream would not wait for it.
    CUDA_TRY(cudaMemcpyAsync(dst, host.data(), host.size() * 4, cudaMemcpyHostToDevice, stream_), "upload");
    CUDA_TRY(cudaStreamSynchronize(stream_), "upload");
    out = static_cast<const float*>(dst);
    return ok_status();
  };
  if (auto s = matrix(w.token_embd, token_embd_); !s) return s;
  lm_head_ = token_embd_;
  if (!w.output.empty())
    if (auto s = matrix(w.output, lm_head_); !s) return s;
  if (auto s = vector(w.output_norm, output_norm_); !s) return s;
  layers_.resize(size_t(c.n_layers));
  for (int32_t l = 0; l < c.n_layers; ++l) {
    const LayerWeights& lw = w.layers[size_t(l)];
    DeviceLayer& d = layers_[size_t(l)];
    for (auto [host, dev] : {std::pair{&lw.wq, &d.wq}, {&lw.wk, &d.wk}, {&lw.wv, &d.wv}, {&lw.wo, &d.wo},
                             {&lw.w_gate, &d.w_gate}, {&lw.w_up, &d.w_up}, {&lw.w_down, &d.w_down}})
      if (auto s = matrix(*host, *dev); !s) return s;
    if (auto s = vector(lw.attn_norm, d.attn_norm); !s) return s;
    if (auto s = vector(lw.ffn_norm, d.ffn_norm); !s) return s;
  }
  return ok_status();
}

Status CudaEngine::random_weights(uint64_t seed) {
  const ModelConfig& c = config();
  uint64_t tensor = 0;
  // Scales of write_synthetic_model: activations stay O(1).
  const float in_scale = 1.0f / std::sqrt(float(c.n_embd)), down_scale = 1.0f / std::sqrt(float(c.n_ff));
  auto matrix = [&](int64_t rows, int64_t cols, float stddev, const void*& out) -> Status {
    void* dst = weight_alloc(rows * cols, dtype_);
    if (dst == nullptr) return Error{"cuda engine: out of GPU memory for weights"};
    CUDA_TRY(kc::fill_random_normal(dst, dtype_, rows * cols, seed * 1000003u + tensor++, stddev, stream_), "init");
    out = dst;
    return ok_status();
  };
  auto ones = [&](int64_t n, const float*& out) -> Status {
    void* dst = weight_alloc(n, DType::F32);
    if (dst == nullptr) return Error{"cuda engine: out of GPU memory for weights"};
    CUDA_TRY(kc::fill_constant(dst, DType::F32, n, 1.0f, stream_), "init");
    out = static_cast<const float*>(dst);
    return ok_status();
  };
  if (auto s = matrix(c.n_vocab, c.n_embd, 1.0f, token_embd_); !s) return s;
  lm_head_ = token_embd_;
  if (!c.tied_embeddings)
    if (auto s = matrix(c.n_vocab, c.n_embd, in_scale, lm_head_); !s) return s;
  if (auto s = ones(c.n_embd, output_norm_); !s) return s;
  layers_.resize(size_t(c.n_layers));
  for (DeviceLayer& d : layers_) {
    Status s = matrix(c.q_dim(), c.n_embd, 2 * in_scale, d.wq);
    if (s) s = matrix(c.kv_dim(), c.n_embd, 2 * in_scale, d.wk);
    if (s) s = matrix(c.kv_dim(), c.n_embd, in_scale, d.wv);
    if (s) s = matrix(c.n_embd, c.q_dim(), in_scale, d.wo);
    if (s) s = matrix(c.n_ff, c.n_embd, in_scale, d.w_gate);
    if (s) s = matrix(c.n_ff, c.n_embd, in_scale, d.w_up);
    if (s) s = matrix(c.n_embd, c.n_ff, down_scale, d.w_down);
    if (s) s = ones(c.n_embd, d.attn_norm);
    if (s) s = ones(c.n_embd, d.ffn_norm);
    if (!s) return s;
  }
  CUDA_TRY(cudaStreamSynchronize(stream_), "init");
  return ok_status();
}

Status CudaEngine::ensure_workspace(int64_t n) {
  n = std::max(n, kMinWorkspaceRows);
  if (n <= workspace_rows_) return ok_status();
  const ModelConfig& c = config();
  const size_t el = size_t(kernels::dtype_bytes(dtype_)), rows = size_t(n);
  // Before any reserve: a buffer that moves, or fails and is left empty, must
  // neither stay in a graph nor pass for a valid workspace on the next call.
  drop_graph();
  workspace_rows_ = 0;
  const bool ok =
      x_.reserve(rows * size_t(c.n_embd) * 4) && xn_.reserve(rows * size_t(c.n_embd) * el) &&
      q_.reserve(rows * size_t(c.q_dim()) * 4) && k_.reserve(rows * size_t(c.kv_dim()) * 4) &&
      v_.reserve(rows * size_t(c.kv_dim()) * 4) && attn_.reserve(rows * size_t(c.q_dim()) * 4) &&
      attn_t_.reserve(rows * size_t(c.q_dim()) * el) && proj_.reserve(rows * size_t(c.n_embd) * 4) &&
      gate_.reserve(rows * size_t(c.n_ff) * 4) && up_.reserve(rows * size_t(c.n_ff) * 4) &&
      act_.reserve(rows * size_t(c.n_ff) * el) && ids_.reserve(rows * 4) &&
      positions_.reserve(rows * size_t(c.n_kv_heads) * 4) &&
      logits_.reserve(size_t(kLogitsChunkRows) * size_t(c.n_vocab) * 4) &&
      host_logits_.reserve(size_t(kLogitsChunkRows) * size_t(c.n_vocab) * 4) && host_small_.reserve(rows * 8);
  if (!ok) return Error{fmt::format("cuda engine: out of GPU memory for a call of {} tokens", n)};
  workspace_rows_ = n;
  return ok_status();
}

void CudaEngine::drop_graph() {
  if (graph_ != nullptr) cudaGraphExecDestroy(graph_);
  graph_ = nullptr;
  graph_max_keys_ = 0;
}

std::string CudaEngine::device_description() const {
  return fmt::format("cuda: {}, {}", device_name_, kernels::dtype_name(dtype_));
}

std::vector<float> CudaEngine::download(const float* device, int64_t count) {
  std::vector<float> host(static_cast<size_t>(count));
  cudaError_t err = cudaMemcpyAsync(host.data(), device, size_t(count) * 4, cudaMemcpyDeviceToHost, stream_);
  if (err == cudaSuccess) err = cudaStreamSynchronize(stream_);
  // A method must never decide on zeros that stand for a failed copy; forward() turns this into an Error.
  if (err != cudaSuccess) throw std::runtime_error(std::string("download for a method hook: ") + cudaGetErrorString(err));
  return host;
}

Status CudaEngine::gemm(const void* x, const void* w, float* y, int64_t m, int64_t n, int64_t k) {
  if (kc::gemm_xwt(cublas_, x, w, dtype_, y, m, n, k) != CUBLAS_STATUS_SUCCESS)
    return Error{fmt::format("cuda: cuBLAS GEMM ({} x {} x {}) failed", m, n, k)};
  return ok_status();
}

Status CudaEngine::forward(KvSequence& seq, std::span<const int32_t> tokens, int64_t logits_from,
                           const LogitsSink& sink) {
  const int64_t n = int64_t(tokens.size());
  if (n == 0) return ok_status();
  if (auto s = check_call(seq, tokens); !s) return s;
  try {
    // A failed call may have returned with uploads from the pinned staging
    // buffers still queued; this call rewrites them.
    CUDA_TRY(cudaStreamSynchronize(stream_), "forward");
    events_used_ = 0;  // pairs a failed call left unfinished are not counted
    if (auto s = ensure_workspace(n); !s) return s;
    const StepInfo step{seq.forward_calls(), seq.n_past(), int32_t(n)};
    ++counters_.forward_calls;
    if (step.decode()) ++counters_.decode_steps;
    if (graph_eligible(step)) return decode_graph_step(seq, step, tokens[0], logits_from < 1 ? sink : nullptr);
    if (auto s = forward_layers(seq, step, tokens); !s) return s;
    seq.set_n_past(step.first_position + int32_t(n));
    seq.count_forward_call();
    if (auto s = logits(n, std::max<int64_t>(logits_from, 0), sink); !s) return s;
    CUDA_TRY(cudaStreamSynchronize(stream_), "forward");
    collect_attention_time();
    return ok_status();
  } catch (const std::bad_alloc&) {
    return Error{"cuda: out of GPU memory (KV cache pages)"};
  } catch (const std::exception& e) {
    return Error{std::string("cuda: ") + e.what()};
  }
}

Status CudaEngine::forward_layers(KvSequence& seq, const StepInfo& step, std::span<const int32_t> tokens) {
  const ModelConfig& c = config();
  const int64_t n = step.n_tokens;
  int32_t* staged = host_small_.as<int32_t>();  // (2, n): ids, positions
  host_positions_.resize(size_t(n));
  for (int64_t i = 0; i < n; ++i) {
    staged[i] = tokens[size_t(i)];
    staged[n + i] = host_positions_[size_t(i)] = step.first_position + int32_t(i);
  }
  CUDA_TRY(cudaMemcpyAsync(ids_.as(), staged, size_t(n) * 4, cudaMemcpyHostToDevice, stream_), "upload ids");
  CUDA_TRY(cudaMemcpyAsync(positions_.as(), staged + n, size_t(n) * 4, cudaMemcpyHostToDevice, stream_),
           "upload positions");
  CUDA_TRY(kc::embedding_lookup(token_embd_, dtype_, c.n_embd, ids_.as<int32_t>(), n, x_.as<float>(), stream_),
           "embedding");

  LayerPlan plan;
  plan.run.assign(size_t(c.n_layers), 1);
  if ((hooks_ & kHookLayerPlan) != 0 && method_->plan_layers(step, plan) && plan.run.size() != size_t(c.n_layers))
    return Error{fmt::format("method: layer plan has {} entries, the model has {} layers", plan.run.size(),
                             c.n_layers)};
  bool exited = false;
  for (int32_t l = 0; l < c.n_layers; ++l) {
    if (exited || plan.run[size_t(l)] == 0) {
      if (plan.kv_fill == SkippedLayerKv::FromHidden)
        if (auto s = fill_skipped_layer(seq, step, l); !s) return s;
      ++counters_.layers_skipped;
      continue;
    }
    if (auto s = run_layer(seq, step, l); !s) return s;
    if ((hooks_ & kHookLayerPlan) != 0 && l + 1 < c.n_layers) {
      const auto hidden = download(x_.as<float>() + (n - 1) * c.n_embd, c.n_embd);
      exited = method_->exit_after_layer(step, l, hidden);
    }
  }
  return ok_status();
}

Status CudaEngine::project_qkv(int32_t l, int64_t n, bool queries) {
  const ModelConfig& c = config();
  const DeviceLayer& d = layers_[size_t(l)];
  CUDA_TRY(kc::rmsnorm(x_.as<float>(), d.attn_norm, n, c.n_embd, c.rms_eps, xn_.as(), dtype_, stream_), "rmsnorm");
  if (queries)
    if (auto s = gemm(xn_.as(), d.wq, q_.as<float>(), n, c.q_dim(), c.n_embd); !s) return s;
  if (auto s = gemm(xn_.as(), d.wk, k_.as<float>(), n, c.kv_dim(), c.n_embd); !s) return s;
  return gemm(xn_.as(), d.wv, v_.as<float>(), n, c.kv_dim(), c.n_embd);
}

Status CudaEngine::rope(KvSequence& seq, int32_t l, int64_t n, bool queries) {
  const ModelConfig& c = config();
  // Stored counts before this call: the first new token's index per kv head.
  int32_t* counts = host_n_cached_.as<int32_t>() + int64_t(l) * c.n_kv_heads;
  for (int32_t g = 0; g < c.n_kv_heads; ++g) counts[g] = seq.table(l, g).n_tokens();
  int32_t* device_counts = n_cached_.as<int32_t>() + int64_t(l) * c.n_kv_heads;
  CUDA_TRY(cudaMemcpyAsync(device_counts, counts, size_t(c.n_kv_heads) * 4, cudaMemcpyHostToDevice, stream_),
           "upload stored counts");
  int32_t groups = 1;
  if (cache_positions_) {
    CUDA_TRY(kc::cache_positions(device_counts, c.n_kv_heads, int32_t(n), positions_.as<int32_t>(), stream_),
             "cache positions");
    groups = c.n_kv_heads;
  }
  const int32_t* pos = positions_.as<int32_t>();
  if (queries)
    CUDA_TRY(kc::rope(q_.as<float>(), n, c.q_dim(), c.n_heads, c.head_dim, c.rope_dim, pos, groups, c.rope_theta,
                      c.rope_neox, stream_),
             "rope");
  CUDA_TRY(kc::rope(k_.as<float>(), n, c.kv_dim(), c.n_kv_heads, c.head_dim, c.rope_dim, pos, groups, c.rope_theta,
                    c.rope_neox, stream_),
           "rope");
  return ok_status();
}

Status CudaEngine::sync_table(const KvSequence& seq, int32_t l, int32_t g) {
  const ModelConfig& c = config();
  const size_t index = size_t(l) * size_t(c.n_kv_heads) + size_t(g);
  const HeadPageTable& t = seq.table(l, g);
  TableSync& s = table_sync_[index];
  const int32_t pages = int32_t(t.pages.size());
  if (pages > max_pages_) return Error{fmt::format("cuda engine: page table of {} pages exceeds {}", pages, max_pages_)};
  const int32_t from = s.seq_id == seq.id() && s.rewrites == t.rewrites ? std::min(s.pages, pages) : 0;
  if (from < pages) {
    int32_t* host = host_tables_.as<int32_t>() + index * size_t(max_pages_);
    std::copy(t.pages.begin() + from, t.pages.end(), host + from);
    int32_t* device = tables_.as<int32_t>() + index * size_t(max_pages_);
    CUDA_TRY(cudaMemcpyAsync(device + from, host + from, size_t(pages - from) * 4, cudaMemcpyHostToDevice, stream_),
             "upload page table");
  }
  s = TableSync{seq.id(), t.rewrites, pages};
  return ok_status();
}

Status CudaEngine::append_kv(KvSequence& seq, int32_t l, int64_t n) {
  const ModelConfig& c = config();
  std::vector<int32_t> rotary(static_cast<size_t>(n));
  for (int32_t g = 0; g < c.n_kv_heads; ++g) {
    const int32_t stored = seq.table(l, g).n_tokens();
    for (int64_t i = 0; i < n; ++i) rotary[size_t(i)] = cache_positions_ ? stored + int32_t(i) : host_positions_[size_t(i)];
    seq.reserve(l, g, int32_t(n), host_positions_.data(), rotary.data());
    if (auto s = sync_table(seq, l, g); !s) return s;
  }
  const kernels::LayerPageTable table{tables_.as<int32_t>() + int64_t(l) * c.n_kv_heads * max_pages_, max_pages_};
  CUDA_TRY(kc::kv_append(cuda_kv_pages(*pool_), table, n_cached_.as<int32_t>() + int64_t(l) * c.n_kv_heads,
                         k_.as<float>(), v_.as<float>(), int32_t(n), c.n_kv_heads, stream_),
           "KV append");
  return ok_status();
}

Status CudaEngine::run_layer(KvSequence& seq, const StepInfo& step, int32_t l) {
  const ModelConfig& c = config();
  const DeviceLayer& d = layers_[size_t(l)];
  const int64_t n = step.n_tokens;
  ComponentMask mask;
  const ComponentMask* active_mask = nullptr;
  if ((hooks_ & kHookComponentMask) != 0) {
    mask.heads.assign(size_t(c.n_heads), 1);
    const auto hidden = download(x_.as<float>(), n * c.n_embd);
    if (method_->mask_components(step, l, hidden, mask)) {
      if (auto s = check_component_mask(mask, c, l); !s) return s;
      active_mask = &mask;
    }
  }
  if (auto s = project_qkv(l, n, true); !s) return s;
  if (auto s = rope(seq, l, n, true); !s) return s;
  if (auto s = attention(seq, step, l, active_mask); !s) return s;
  CUDA_TRY(kc::convert_from_float(attn_.as<float>(), n * c.q_dim(), attn_t_.as(), dtype_, stream_), "convert");
  if (auto s = gemm(attn_t_.as(), d.wo, proj_.as<float>(), n, c.n_embd, c.q_dim()); !s) return s;
  CUDA_TRY(kc::add_inplace(x_.as<float>(), proj_.as<float>(), n * c.n_embd, stream_), "residual");
  CUDA_TRY(kc::rmsnorm(x_.as<float>(), d.ffn_norm, n, c.n_embd, c.rms_eps, xn_.as(), dtype_, stream_), "rmsnorm");
  if (auto s = ffn(l, n, active_mask); !s) return s;
  CUDA_TRY(kc::add_inplace(x_.as<float>(), proj_.as<float>(), n * c.n_embd, stream_), "residual");
  return ok_status();
}

Status CudaEngine::fill_skipped_layer(KvSequence& seq, const StepInfo& step, int32_t l) {
  // The layer is an identity on the residual stream; its cache still gets the
  // K/V of the hidden state that passes it, so later tokens can attend to it.
  if (auto s = project_qkv(l, step.n_tokens, false); !s) return s;
  if (auto s = rope(seq, l, step.n_tokens, false); !s) return s;
  return append_kv(seq, l, step.n_tokens);
}

kernels::AttentionCall CudaEngine::base_call(int32_t l, int64_t n) const {
  const ModelConfig& c = config();
  kernels::AttentionCall call;
  call.n_rows = int32_t(n);
  call.n_heads = c.n_heads;
  call.n_kv_heads = c.n_kv_heads;
  call.head_dim = c.head_dim;
  call.scale = 1.0f / std::sqrt(float(c.head_dim));
  call.q = q_.as<float>();
  call.out = attn_.as<float>();
  call.n_cached = n_cached_.as<int32_t>() + int64_t(l) * c.n_kv_heads;
  call.kv = cuda_kv_pages(*pool_);
  call.table = {tables_.as<int32_t>() + int64_t(l) * c.n_kv_heads * max_pages_, max_pages_};
  return call;
}

Status CudaEngine::attention(KvSequence& seq, const StepInfo& step, int32_t l, const ComponentMask* mask) {
  const ModelConfig& c = config();
  const int64_t n = step.n_tokens;
  kernels::AttentionCall call = base_call(l, n);
  int32_t max_keys = 0;
  for (int32_t g = 0; g < c.n_kv_heads; ++g) max_keys = std::max(max_keys, seq.table(l, g).n_tokens());
  max_keys += int32_t(n);
  if (mask != nullptr) {
    CUDA_TRY(cudaMemcpyAsync(head_active_.as(), mask->heads.data(), size_t(c.n_heads), cudaMemcpyHostToDevice, stream_),
             "upload head mask");
    CUDA_TRY(cudaStreamSynchronize(stream_), "upload head mask");
    call.head_active = head_active_.as<uint8_t>();
    counters_.heads_skipped += std::count(mask->heads.begin(), mask->heads.end(), uint8_t{0});
  }
  if (auto s = select_keys(seq, step, l, call); !s) return s;  // sees the cache before this call's tokens
  if (auto s = append_kv(seq, l, n); !s) return s;
  if (auto s = prefill_patterns(seq, step, l, call); !s) return s;
  if ((hooks_ & kHookAttentionFeedback) != 0) {
    CUDA_TRY(cudaMemsetAsync(key_mass_.as(), 0, size_t(c.n_kv_heads) * size_t(max_context_) * 4, stream_), "stats");
    call.key_mass = key_mass_.as<float>();
    call.mass_stride = max_context_;
  }
  const size_t ws = kc::attention_workspace_bytes(call, max_keys);
  if (ws > attention_ws_.bytes()) drop_graph();  // it holds the workspace's old address
  if (!attention_ws_.reserve(ws)) return Error{"cuda engine: out of GPU memory for the attention workspace"};
  cudaEvent_t* events = nullptr;
  if (options_.time_attention) {
    if (auto s = next_event_pair(events); !s) return s;
    CUDA_TRY(cudaEventRecord(events[0], stream_), "attention timing");
  }
  CUDA_TRY(kc::attention(call, max_keys, attention_ws_.as(), attention_ws_.bytes(), stream_), "attention");
  if (events != nullptr) CUDA_TRY(cudaEventRecord(events[1], stream_), "attention timing");
  return feedback_and_evict(seq, step, l);
}

Status CudaEngine::select_keys(KvSequence& seq, const StepInfo& step, int32_t l, kernels::AttentionCall& call) {
  const ModelConfig& c = config();
  const int32_t ps = options_.page_size, gs = c.group_size();
  const DeviceKvView view(seq, stream_);
  const std::vector<int32_t> budgets = page_budgets(step, view, seq, l);
  bool ask = false, by_bound = false;
  int32_t bound_pages = 0;  // the most pages of a head selected by bound
  for (int32_t g = 0; g < c.n_kv_heads; ++g) {
    ask = ask || budgets[size_t(g)] < 0;
    if (budgets[size_t(g)] > 0) {
      by_bound = true;
      bound_pages = std::max(bound_pages, (seq.table(l, g).n_tokens() + ps - 1) / ps);
    }
  }
  const bool hook = ask && (hooks_ & kHookDecodeSelection) != 0;
  std::vector<float> queries;
  if (hook) queries = download(q_.as<float>() + (step.n_tokens - 1) * c.q_dim(), c.q_dim());
  // Device layout (int32): indptr (n_kv_heads + 1), indices, then the modes as
  // bytes. Heads selected by bound get `budget` slots that page_select fills.
  std::vector<int32_t> indptr{0}, indices;
  std::vector<uint8_t>& modes = select_modes_;
  modes.assign(size_t(c.n_kv_heads), uint8_t(kernels::KeySelect::All));
  bool any = false;
  for (int32_t g = 0; g < c.n_kv_heads; ++g) {
    const int32_t cached = seq.table(l, g).n_tokens(), budget = budgets[size_t(g)];
    KvSelection sel;
    int64_t keys = cached, pages = (cached + ps - 1) / ps;
    if (budget > 0) {
      any = true;
      modes[size_t(g)] = uint8_t(kernels::KeySelect::Pages);
      indices.insert(indices.end(), size_t(budget), 0);
      keys = int64_t(budget - 1) * ps + (cached - (pages - 1) * ps);  // full pages, then the last
      pages = budget;
    } else if (budget < 0 && hook &&
               method_->select_kv(step, view, l, g,
                                  std::span<const float>(queries.data() + int64_t(g) * gs * c.head_dim,
                                                         size_t(gs * c.head_dim)),
                                  sel)) {
      if (auto s = check_kv_selection(sel, cached, ps, l, g); !s) return s;
      any = true;
      const bool by_page = sel.unit == KvSelection::Unit::Pages;
      modes[size_t(g)] = uint8_t(by_page ? kernels::KeySelect::Pages : kernels::KeySelect::Tokens);
      indices.insert(indices.end(), sel.indices.begin(), sel.indices.end());
      keys = 0;
      pages = 0;
      int32_t last_page = -1;
      for (int32_t x : sel.indices) {
        keys += by_page ? std::min(ps, cached - x * ps) : 1;
        const int32_t page = by_page ? x : x / ps;
        pages += page != last_page;
        last_page = page;
      }
    }
    indptr.push_back(int32_t(indices.size()));
    if (step.decode()) {
      counters_.decode_keys_read += keys;
      counters_.decode_keys_cached += cached;
      counters_.decode_pages_read += pages;
    }
  }
  if (!any) return ok_status();
  auto csr = upload_csr(select_, indptr, indices, modes, stream_, "selection");
  if (!csr) return csr.error();
  call.select_indptr = csr->indptr;
  call.select_index = csr->items;
  call.select = csr->flags;
  if (!by_bound) return ok_status();
  return select_by_bound(seq, step, l, budgets, bound_pages, csr->indptr, const_cast<int32_t*>(csr->items));
}

// Refreshes the key bounds of the stale pages of every head with a budget,
// then scores and selects on the device into the selection's slots.
Status CudaEngine::select_by_bound(KvSequence& seq, const StepInfo& step, int32_t l,
                                   const std::vector<int32_t>& budgets, int32_t max_pages, const int32_t* offsets,
                                   int32_t* out) {
  const ModelConfig& c = config();
  const int32_t nkv = c.n_kv_heads;
  // Bounds live per physical page: grow (keeping what they hold) with the pool.
  const int64_t page_bound_bytes = 2 * int64_t(c.head_dim) * kernels::dtype_bytes(dtype_);
  const int64_t needed = pool_->pages_reserved();
  if (needed > bound_pages_) {
    const int64_t grown = std::max(needed, bound_pages_ + bound_pages_ / 4);
    DeviceMemory bigger;
    if (!bigger.reserve(size_t(grown * page_bound_bytes))) return Error{"cuda engine: out of GPU memory for page bounds"};
    if (bound_pages_ > 0)
      CUDA_TRY(cudaMemcpyAsync(bigger.as(), page_bounds_.as(), size_t(bound_pages_ * page_bound_bytes),
                               cudaMemcpyDeviceToDevice, stream_),
               "grow page bounds");
    CUDA_TRY(cudaStreamSynchronize(stream_), "grow page bounds");
    page_bounds_ = std::move(bigger);
    bound_pages_ = grown;
  }
  // Staged (int32): keep (n_kv_heads), then the stale pages and their filled slots.
  std::vector<int32_t> staged(budgets.begin(), budgets.end()), pages, counts;
  std::vector<PageBoundSync> covered(static_cast<size_t>(nkv));  // recorded once the kernels are launched
  for (int32_t& k : staged) k = std::max(k, 0);
  for (int32_t g = 0; g < nkv; ++g)
    if (budgets[size_t(g)] > 0) {
      if (auto s = sync_table(seq, l, g); !s) return s;  // the kernels read it before this call's append
      covered[size_t(g)] = stale_bound_pages(seq, l, g, seq.table(l, g).n_tokens(),
                                             bound_sync_[size_t(l) * size_t(nkv) + size_t(g)], pages, counts);
    }
  const int32_t stale = int32_t(pages.size());
  staged.insert(staged.end(), pages.begin(), pages.end());
  staged.insert(staged.end(), counts.begin(), counts.end());
  if (!bound_work_.reserve(staged.size() * 4) ||
      !bound_scores_.reserve(size_t(nkv) * size_t(max_pages) * 4))
    return Error{"cuda engine: out of GPU memory for page selection"};
  CUDA_TRY(cudaMemcpyAsync(bound_work_.as(), staged.data(), staged.size() * 4, cudaMemcpyHostToDevice, stream_),
           "upload page bounds work");
  CUDA_TRY(cudaStreamSynchronize(stream_), "upload page bounds work");  // `staged` is pageable and ours
  const int32_t* keep = bound_work_.as<int32_t>();
  const kernels::KvPages kv = cuda_kv_pages(*pool_);
  cudaEvent_t* events = nullptr;  // the selection counts as attention time, as in Quest's kernel timings
  if (options_.time_attention) {
    if (auto s = next_event_pair(events); !s) return s;
    CUDA_TRY(cudaEventRecord(events[0], stream_), "attention timing");
  }
  CUDA_TRY(kc::page_bounds_update(kv, page_bounds_.as(), keep + nkv, keep + nkv + stale, stale, stream_),
           "page bounds");
  kernels::PageSelectCall call;
  call.n_kv_heads = nkv;
  call.group_size = c.group_size();
  call.head_dim = c.head_dim;
  call.page_size = options_.page_size;
  call.dtype = dtype_;
  call.bounds = page_bounds_.as();
  call.table = {tables_.as<int32_t>() + int64_t(l) * nkv * max_pages_, max_pages_};
  call.q = q_.as<float>() + (step.n_tokens - 1) * c.q_dim();
  call.n_cached = n_cached_.as<int32_t>() + int64_t(l) * nkv;
  call.keep = keep;
  call.out_offset = offsets;
  call.out = out;
  call.scores = bound_scores_.as<float>();
  call.score_stride = max_pages;
  CUDA_TRY(kc::page_select(call, max_pages, stream_), "page selection");
  if (events != nullptr) CUDA_TRY(cudaEventRecord(events[1], stream_), "attention timing");
  for (int32_t g = 0; g < nkv; ++g)
    if (budgets[size_t(g)] > 0) bound_sync_[size_t(l) * size_t(nkv) + size_t(g)] = covered[size_t(g)];
  return ok_status();
}

Status CudaEngine::prefill_patterns(const KvSequence& seq, const StepInfo& step, int32_t l,
                                    kernels::AttentionCall& call) {
  const ModelConfig& c = config();
  if ((hooks_ & kHookPrefillPattern) == 0 || step.decode()) return ok_status();
  std::vector<std::optional<BlockPattern>> patterns(size_t(c.n_heads));
  int32_t block_size = 0;
  for (int32_t h = 0; h < c.n_heads; ++h) {
    BlockPattern pattern;
    if (!method_->prefill_pattern(step, l, h, pattern)) continue;
    const bool selected = select_modes_[size_t(h / c.group_size())] != uint8_t(kernels::KeySelect::All);
    if (auto s = normalize_block_pattern(pattern, l, h, selected); !s) return s;
    if (block_size != 0 && pattern.block_size != block_size)
      return Error{fmt::format("method: prefill pattern of (layer {}, head {}): block_size {} differs from another "
                               "head's {} (the CUDA backend needs one per layer)",
                               l, h, pattern.block_size, block_size)};
    block_size = pattern.block_size;
    patterns[size_t(h)] = std::move(pattern);
    ++counters_.sparse_prefill_heads;
  }
  if (block_size == 0) return ok_status();
  // Query blocks cover every head's stored tokens (this call's are appended):
  // the kernel gives rows past n_query_blocks no keys at all.
  int32_t stored = 0;
  for (int32_t g = 0; g < c.n_kv_heads; ++g) stored = std::max(stored, seq.table(l, g).n_tokens());
  const int32_t n_qb = (stored + block_size - 1) / block_size;
  std::vector<int32_t> indptr, keys;
  std::vector<uint8_t> flags(size_t(c.n_heads), 0);
  for (int32_t h = 0; h < c.n_heads; ++h) {
    const auto& p = patterns[size_t(h)];
    flags[size_t(h)] = p.has_value();
    size_t at = 0;
    for (int32_t qb = 0; qb <= n_qb; ++qb) {
      indptr.push_back(int32_t(keys.size()));
      if (!p || qb == n_qb) continue;
      while (at < p->blocks.size() && p->blocks[at].first < qb) ++at;
      for (; at < p->blocks.size() && p->blocks[at].first == qb; ++at) keys.push_back(p->blocks[at].second);
    }
  }
  auto csr = upload_csr(blocks_, indptr, keys, flags, stream_, "block pattern");
  if (!csr) return csr.error();
  call.block_size = block_size;
  call.n_query_blocks = n_qb;
  call.block_indptr = csr->indptr;
  call.block_keys = csr->items;
  call.block_sparse = csr->flags;
  return ok_status();
}

Status CudaEngine::feedback_and_evict(KvSequence& seq, const StepInfo& step, int32_t l) {
  const ModelConfig& c = config();
  const int32_t gs = c.group_size();
  if ((hooks_ & (kHookAttentionFeedback | kHookEviction)) == 0) return ok_status();
  const DeviceKvView view(seq, stream_);
  if ((hooks_ & kHookAttentionFeedback) != 0) {
    CUDA_TRY(kc::head_output_norms(attn_.as<float>(), step.n_tokens, c.n_heads, c.head_dim, head_norms_.as<float>(),
                                   stream_),
             "head norms");
    const auto norms = download(head_norms_.as<float>(), c.n_heads);
    for (int32_t g = 0; g < c.n_kv_heads; ++g) {
      const auto mass = download(key_mass_.as<float>() + int64_t(g) * max_context_, seq.table(l, g).n_tokens());
      method_->on_attention(step, view,
                            AttentionStats{l, g, mass, std::span<const float>(norms.data() + g * gs, size_t(gs))});
    }
  }
  if ((hooks_ & kHookEviction) == 0) return ok_status();
  CUDA_TRY(cudaStreamSynchronize(stream_), "eviction");  // page-table uploads read the host copy being rewritten
  std::vector<int32_t> drop;
  for (int32_t g = 0; g < c.n_kv_heads; ++g) {
    drop.clear();
    method_->evict(step, view, l, g, drop);
    if (drop.empty()) continue;
    auto dropped = seq.evict(l, g, std::move(drop));
    if (!dropped) return Error{"method: " + dropped.message()};
    counters_.tokens_evicted += *dropped;
    if (cache_positions_)
      if (auto s = rerotate_keys(seq, l, g); !s) return s;
    view.forget(l, g);  // the method may read this head again while evicting the next
    drop = {};
  }
  return ok_status();
}

Status CudaEngine::rerotate_keys(KvSequence& seq, int32_t l, int32_t g) {
  // RoPE rotations compose: turning a key by (new - old) positions equals
  // rotating the unrotated key at its new position.
  const ModelConfig& c = config();
  HeadPageTable& t = seq.table(l, g);
  const int32_t ps = options_.page_size;
  std::vector<int32_t> page, slot, delta;
  for (int32_t i = 0; i < t.n_tokens(); ++i) {
    if (t.rotary[size_t(i)] == i) continue;
    page.push_back(t.pages[size_t(i / ps)]);
    slot.push_back(i % ps);
    delta.push_back(i - t.rotary[size_t(i)]);
    t.rotary[size_t(i)] = i;
  }
  if (page.empty()) return ok_status();
  const int32_t n = int32_t(page.size());
  std::vector<int32_t> moved = page;  // (3, n): page, slot, delta
  moved.insert(moved.end(), slot.begin(), slot.end());
  moved.insert(moved.end(), delta.begin(), delta.end());
  if (!select_.reserve(moved.size() * 4)) return Error{"cuda engine: out of GPU memory for re-rotation"};
  const int32_t* d = select_.as<int32_t>();
  CUDA_TRY(cudaMemcpyAsync(select_.as(), moved.data(), moved.size() * 4, cudaMemcpyHostToDevice, stream_), "re-rotate");
  CUDA_TRY(kc::kv_rope_shift(cuda_kv_pages(*pool_), d, d + n, d + 2 * n, n, c.rope_dim, c.rope_theta, c.rope_neox,
                             stream_),
           "re-rotate");
  CUDA_TRY(cudaStreamSynchronize(stream_), "re-rotate");
  return ok_status();
}

Status CudaEngine::ffn(int32_t l, int64_t n, const ComponentMask* mask) {
  const ModelConfig& c = config();
  const DeviceLayer& d = layers_[size_t(l)];
  if (mask == nullptr || mask->all_neurons) {
    if (auto s = gemm(xn_.as(), d.w_gate, gate_.as<float>(), n, c.n_ff, c.n_embd); !s) return s;
    if (auto s = gemm(xn_.as(), d.w_up, up_.as<float>(), n, c.n_ff, c.n_embd); !s) return s;
    CUDA_TRY(kc::silu_mul(gate_.as<float>(), up_.as<float>(), n * c.n_ff, act_.as(), dtype_, stream_), "swiglu");
    return gemm(act_.as(), d.w_down, proj_.as<float>(), n, c.n_embd, c.n_ff);
  }
  // Only the selected neurons' rows of gate/up and of the transposed down weight are read.
  const int64_t k = int64_t(mask->neurons.size());
  counters_.neurons_skipped += c.n_ff - k;
  if (k == 0) {
    CUDA_TRY(cudaMemsetAsync(proj_.as(), 0, size_t(n * c.n_embd) * 4, stream_), "ffn");
    return ok_status();
  }
  const size_t el = size_t(kernels::dtype_bytes(dtype_));
  if (!w_sel_.reserve(size_t(k) * size_t(c.n_embd) * el) || !select_.reserve(size_t(k) * 4))
    return Error{"cuda engine: out of GPU memory for a neuron subset"};
  const int32_t* rows = select_.as<int32_t>();
  CUDA_TRY(cudaMemcpyAsync(select_.as(), mask->neurons.data(), size_t(k) * 4, cudaMemcpyHostToDevice, stream_),
           "neuron subset");
  CUDA_TRY(kc::gather_rows(d.w_gate, dtype_, c.n_embd, rows, k, w_sel_.as(), stream_), "gather");
  if (auto s = gemm(xn_.as(), w_sel_.as(), gate_.as<float>(), n, k, c.n_embd); !s) return s;
  CUDA_TRY(kc::gather_rows(d.w_up, dtype_, c.n_embd, rows, k, w_sel_.as(), stream_), "gather");
  if (auto s = gemm(xn_.as(), w_sel_.as(), up_.as<float>(), n, k, c.n_embd); !s) return s;
  CUDA_TRY(kc::silu_mul(gate_.as<float>(), up_.as<float>(), n * k, act_.as(), dtype_, stream_), "swiglu");
  const void* down_t = w_down_transposed(l);
  if (down_t == nullptr) return Error{"cuda engine: out of GPU memory for a transposed down projection"};
  CUDA_TRY(kc::gather_rows(down_t, dtype_, c.n_embd, rows, k, w_sel_.as(), stream_), "gather");
  if (kc::gemm_xw(cublas_, act_.as(), w_sel_.as(), dtype_, proj_.as<float>(), n, c.n_embd, k) != CUBLAS_STATUS_SUCCESS)
    return Error{"cuda: cuBLAS GEMM of the selected down rows failed"};
  CUDA_TRY(cudaStreamSynchronize(stream_), "neuron subset");  // mask->neurons is the caller's
  return ok_status();
}

const void* CudaEngine::w_down_transposed(int32_t l) {
  const ModelConfig& c = config();
  if (w_down_t_.empty()) w_down_t_.resize(size_t(c.n_layers));
  DeviceMemory& t = w_down_t_[size_t(l)];
  if (t.bytes() == 0) {
    if (!t.reserve(size_t(c.n_ff) * size_t(c.n_embd) * size_t(kernels::dtype_bytes(dtype_)))) return nullptr;
    if (kc::transpose(layers_[size_t(l)].w_down, dtype_, c.n_embd, c.n_ff, t.as(), stream_) != cudaSuccess) {
      t = DeviceMemory{};  // not transposed: the next call must not take it for done
      return nullptr;
    }
  }
  return t.as();
}

Status CudaEngine::logits(int64_t n, int64_t from, const LogitsSink& sink) {
  if (from >= n || !sink) return ok_status();
  const ModelConfig& c = config();
  const int64_t rows = n - from, el = kernels::dtype_bytes(dtype_);
  CUDA_TRY(kc::rmsnorm(x_.as<float>() + from * c.n_embd, output_norm_, rows, c.n_embd, c.rms_eps, xn_.as(), dtype_,
                       stream_),
           "rmsnorm");
  float* host = host_logits_.as<float>();
  for (int64_t r0 = 0; r0 < rows; r0 += kLogitsChunkRows) {
    const int64_t chunk = std::min(kLogitsChunkRows, rows - r0);
    if (auto s = gemm(xn_.as<char>() + r0 * c.n_embd * el, lm_head_, logits_.as<float>(), chunk, c.n_vocab, c.n_embd); !s)
      return s;
    CUDA_TRY(cudaMemcpyAsync(host, logits_.as(), size_t(chunk * c.n_vocab) * 4, cudaMemcpyDeviceToHost, stream_),
             "download logits");
    CUDA_TRY(cudaStreamSynchronize(stream_), "logits");
    for (int64_t r = 0; r < chunk; ++r)
      sink(from + r0 + r, std::span<const float>(host + r * c.n_vocab, size_t(c.n_vocab)));
  }
  return ok_status();
}

bool CudaEngine::graph_eligible(const StepInfo& step) const {
  // Hooks that run on the host inside a step break the graph; load-time hooks don't.
  return options_.cuda_graphs && !options_.time_attention && step.decode() &&
         (hooks_ & ~uint32_t(kHookLoad)) == 0 && !cache_positions_;
}

Status CudaEngine::next_event_pair(cudaEvent_t*& pair) {
  if (events_used_ + 2 > events_.size()) {
    for (int i = 0; i < 2; ++i) {
      cudaEvent_t e = nullptr;
      CUDA_TRY(cudaEventCreate(&e), "attention timing");
      events_.push_back(e);
    }
  }
  pair = &events_[events_used_];
  events_used_ += 2;
  return ok_status();
}

void CudaEngine::collect_attention_time() {
  // Called after the stream was synchronized: every recorded pair has completed.
  for (size_t i = 0; i + 1 < events_used_; i += 2) {
    float ms = 0;
    if (cudaEventElapsedTime(&ms, events_[i], events_[i + 1]) == cudaSuccess) counters_.attention_seconds += ms * 1e-3;
  }
  events_used_ = 0;
}

Status CudaEngine::decode_graph_step(KvSequence& seq, const StepInfo& step, int32_t token, const LogitsSink& sink) {
  const ModelConfig& c = config();
  const int32_t ps = options_.page_size;
  // Everything the graph reads from device memory is staged before the replay.
  int32_t* staged = host_small_.as<int32_t>();
  staged[0] = token;
  staged[1] = step.first_position;
  host_positions_.assign(1, step.first_position);
  CUDA_TRY(cudaMemcpyAsync(ids_.as(), staged, 8, cudaMemcpyHostToDevice, stream_), "upload ids");
  CUDA_TRY(cudaMemcpyAsync(positions_.as(), staged + 1, 4, cudaMemcpyHostToDevice, stream_), "upload positions");
  int32_t* counts = host_n_cached_.as<int32_t>();
  int32_t max_keys = 0;
  for (int32_t l = 0; l < c.n_layers; ++l)
    for (int32_t g = 0; g < c.n_kv_heads; ++g) {
      const int32_t cached = seq.table(l, g).n_tokens();
      counts[l * c.n_kv_heads + g] = cached;
      max_keys = std::max(max_keys, cached + 1);
      counters_.decode_keys_read += cached;
      counters_.decode_keys_cached += cached;
      counters_.decode_pages_read += (cached + ps - 1) / ps;
      seq.reserve(l, g, 1, &step.first_position, &step.first_position);
      if (auto s = sync_table(seq, l, g); !s) return s;
    }
  CUDA_TRY(cudaMemcpyAsync(n_cached_.as(), counts, size_t(c.n_layers) * size_t(c.n_kv_heads) * 4,
                           cudaMemcpyHostToDevice, stream_),
           "upload stored counts");
  // One graph per power-of-two bound on the keys: the split-K grid depends on it.
  int32_t bound = kMinGraphKeys;
  while (bound < max_keys) bound *= 2;
  bound = std::min(bound, std::max(max_context_, max_keys));
  if (graph_ == nullptr || bound != graph_max_keys_) {
    drop_graph();
    if (!attention_ws_.reserve(kc::attention_workspace_bytes(base_call(0, 1), bound)))
      return Error{"cuda engine: out of GPU memory for the attention workspace"};
    cudaGraph_t graph = nullptr;
    CUDA_TRY(cudaStreamBeginCapture(stream_, cudaStreamCaptureModeThreadLocal), "graph capture");
    Status body = ok_status();
    if (kc::embedding_lookup(token_embd_, dtype_, c.n_embd, ids_.as<int32_t>(), 1, x_.as<float>(), stream_) !=
        cudaSuccess)
      body = Error{"cuda: embedding failed in capture"};
    for (int32_t l = 0; l < c.n_layers && body; ++l) {
      const DeviceLayer& d = layers_[size_t(l)];
      body = project_qkv(l, 1, true);
      const int32_t* pos = positions_.as<int32_t>();
      if (body && (kc::rope(q_.as<float>(), 1, c.q_dim(), c.n_heads, c.head_dim, c.rope_dim, pos, 1, c.rope_theta,
                            c.rope_neox, stream_) != cudaSuccess ||
                   kc::rope(k_.as<float>(), 1, c.kv_dim(), c.n_kv_heads, c.head_dim, c.rope_dim, pos, 1, c.rope_theta,
                            c.rope_neox, stream_) != cudaSuccess))
        body = Error{"cuda: rope failed in capture"};
      const kernels::AttentionCall call = base_call(l, 1);
      if (body && (kc::kv_append(call.kv, call.table, call.n_cached, k_.as<float>(), v_.as<float>(), 1, c.n_kv_heads,
                                 stream_) != cudaSuccess ||
                   kc::attention(call, bound, attention_ws_.as(), attention_ws_.bytes(), stream_) != cudaSuccess ||
                   kc::convert_from_float(attn_.as<float>(), c.q_dim(), attn_t_.as(), dtype_, stream_) != cudaSuccess))
        body = Error{"cuda: attention failed in capture"};
      if (body) body = gemm(attn_t_.as(), d.wo, proj_.as<float>(), 1, c.n_embd, c.q_dim());
      if (body && (kc::add_inplace(x_.as<float>(), proj_.as<float>(), c.n_embd, stream_) != cudaSuccess ||
                   kc::rmsnorm(x_.as<float>(), d.ffn_norm, 1, c.n_embd, c.rms_eps, xn_.as(), dtype_, stream_) !=
                       cudaSuccess))
        body = Error{"cuda: residual failed in capture"};
      if (body) body = ffn(l, 1, nullptr);
      if (body && kc::add_inplace(x_.as<float>(), proj_.as<float>(), c.n_embd, stream_) != cudaSuccess)
        body = Error{"cuda: residual failed in capture"};
    }
    if (body && kc::rmsnorm(x_.as<float>(), output_norm_, 1, c.n_embd, c.rms_eps, xn_.as(), dtype_, stream_) !=
                    cudaSuccess)
      body = Error{"cuda: rmsnorm failed in capture"};
    if (body) body = gemm(xn_.as(), lm_head_, logits_.as<float>(), 1, c.n_vocab, c.n_embd);
    const cudaError_t end = cudaStreamEndCapture(stream_, &graph);
    if (!body) {
      if (graph != nullptr) cudaGraphDestroy(graph);
      return body;
    }
    CUDA_TRY(end, "graph capture");
    const cudaError_t inst = cudaGraphInstantiate(&graph_, graph, 0);
    cudaGraphDestroy(graph);
    CUDA_TRY(inst, "graph instantiate");
    graph_max_keys_ = bound;
  }
  CUDA_TRY(cudaGraphLaunch(graph_, stream_), "graph launch");
  ++graph_replays_;
  seq.set_n_past(step.first_position + 1);
  seq.count_forward_call();
  float* host = host_logits_.as<float>();
  if (sink) CUDA_TRY(cudaMemcpyAsync(host, logits_.as(), size_t(c.n_vocab) * 4, cudaMemcpyDeviceToHost, stream_), "logits");
  CUDA_TRY(cudaStreamSynchronize(stream_), "decode step");
  if (sink) sink(0, std::span<const float>(host, size_t(c.n_vocab)));
  return ok_status();
}

}  // namespace inferlab
