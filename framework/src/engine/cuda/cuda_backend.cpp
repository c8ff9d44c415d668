// The CUDA backend's setup, workspace, call lifecycle, attention timing and
// the host view of device KV pages.
#include "engine/cuda/cuda_backend.h"

#include <fmt/format.h>

#include <algorithm>
#include <stdexcept>
#include <tuple>

#include "bit_planes.h"
#include "cpu/cpu_ops.h"
#include "cpu/half_convert.h"
#include "cuda/device_info.cuh"
#include "engine/backend_factory.h"
#include "engine/cuda/cuda_check.h"
#include "engine/cuda/cuda_kv_storage.h"

namespace inferlab {

namespace kc = kernels::cuda;
using kernels::DType;

namespace {

constexpr int64_t kMinWorkspaceRows = 64;  // so short calls never reallocate (CUDA graphs keep addresses)
constexpr size_t kCublasWorkspaceBytes = 32u << 20;

DType kernel_dtype(GpuDType t) { return t == GpuDType::BF16 ? DType::BF16 : DType::F16; }

// The plugin SDK's read-only view of a sequence whose rows live on the GPU:
// positions come from the host page tables; a page's rows are downloaded (as
// float) the first time a method reads one of its tokens, so a method that
// reads only new keys each step copies one page per (layer, kv head).
// Policies that read many keys every step belong in an engine mechanism.
class DeviceKvView final : public BackendKvView {
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
  void forget(int32_t layer, int32_t kv_head) const override {
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
  // (2, page_size, head_dim) floats: K rows then V rows of one page (bit-plane
  // rows decoded from both planes).
  void load(int32_t page, std::vector<float>& out) const {
    const KvPagePool& pool = seq_.pool();
    const kernels::KvPages kv = cuda_kv_pages(pool);
    std::vector<uint8_t> raw(static_cast<size_t>(pool.page_bytes()));
    // The page may still be being written: the copy queues behind that work.
    cudaError_t err = cudaMemcpyAsync(raw.data(), pool.page_data(page), raw.size(), cudaMemcpyDeviceToHost, stream_);
    if (err == cudaSuccess) err = cudaStreamSynchronize(stream_);
    if (err != cudaSuccess) throw std::runtime_error(std::string("KV view: ") + cudaGetErrorString(err));
    const int64_t rows = 2 * int64_t(kv.page_size), hd = kv.head_dim;
    out.resize(size_t(rows * hd));
    if (kv.planes.active()) {
      for (int64_t r = 0; r < rows; ++r)
        kernels::cpu::bit_plane_decode(raw.data() + r * kv.row_bytes(), hd, kv.planes, true, out.data() + r * hd);
      return;
    }
    const auto* half = reinterpret_cast<const uint16_t*>(raw.data());
    for (size_t i = 0; i < out.size(); ++i)
      out[i] = kv.dtype == DType::BF16 ? kernels::cpu::bf16_to_float(half[i]) : kernels::cpu::f16_to_float(half[i]);
  }
  const KvSequence& seq_;
  cudaStream_t stream_;
  mutable std::map<PageKey, std::vector<float>> cache_;
};

}  // namespace

Result<std::unique_ptr<Backend>> make_cuda_backend(std::shared_ptr<const Model> model, const EngineOptions& options,
                                                   int32_t max_context) {
  if (!model->has_weights()) return Error{"cuda engine: the model has no weights (use create_random)"};
  auto backend = std::make_unique<CudaBackend>(std::move(model), options, max_context);
  if (auto s = backend->init_device(); !s) return s.error();
  if (auto s = backend->upload_weights(); !s) return s.error();
  return std::unique_ptr<Backend>(std::move(backend));
}

Result<std::unique_ptr<Backend>> make_cuda_random_backend(std::shared_ptr<const Model> model,
                                                          const EngineOptions& options, int32_t max_context,
                                                          uint64_t seed) {
  auto backend = std::make_unique<CudaBackend>(std::move(model), options, max_context);
  if (auto s = backend->init_device(); !s) return s.error();
  if (auto s = backend->random_weights(seed); !s) return s.error();
  return std::unique_ptr<Backend>(std::move(backend));
}

CudaBackend::CudaBackend(std::shared_ptr<const Model> model, const EngineOptions& options, int32_t max_context)
    : model_(std::move(model)),
      config_(model_->config()),
      options_(options),
      max_context_(max_context),
      dtype_(kernel_dtype(options.gpu_dtype)),
      time_attention_(options.time_attention) {}

CudaBackend::~CudaBackend() {
  if (stream_ != nullptr) cudaStreamSynchronize(stream_);
  // The pools' pages before the stream they are copied on (the engine let go of its shares first).
  pool_.reset();
  bit_plane_pools_.clear();
  drop_graphs();
  for (cudaEvent_t e : events_) cudaEventDestroy(e);
  for (cudaEvent_t e : sparse_events_)
    if (e != nullptr) cudaEventDestroy(e);
  if (cublas_ != nullptr) cublasDestroy(cublas_);
  if (pred_stream_ != nullptr) cudaStreamSynchronize(pred_stream_);
  for (cudaEvent_t e : {pred_fork_, pred_heads_ready_, pred_neurons_ready_, pred_done_})
    if (e != nullptr) cudaEventDestroy(e);
  if (pred_stream_ != nullptr) cudaStreamDestroy(pred_stream_);
  // stream_owner_ destroys the stream once no pool's storage holds it either.
}

bool CudaBackend::supports(Feature feature) const {
  switch (feature) {
    case Feature::KvPagesF32: return false;  // the attention kernels read f16/bf16 pages
    case Feature::KvPagesF16: return dtype_ == DType::F16;
    case Feature::KvPagesBF16: return dtype_ == DType::BF16;
    case Feature::KvBitPlanes: return true;  // kv_append quantizes, attention_progressive reads them
    case Feature::ExitConfidence: return true;  // cuda_exits.cpp: the confidences on the device
    case Feature::BatchedCalls: return true;    // focus_segment: the per-sequence ops on a segment's rows in place
    default: return true;
  }
}

Status CudaBackend::init_device() {
  const ModelConfig& c = config_;
  const int devices = kc::device_count();
  if (devices == 0) return Error{"cuda engine: no CUDA GPU is visible on this machine"};
  if (c.head_dim != 64 && c.head_dim != 128)
    return Error{fmt::format("cuda engine: head_dim {} is not supported by the attention kernels (64, 128)",
                             c.head_dim)};
  if (options_.device < 0 || options_.device >= devices)
    return Error{fmt::format("cuda engine: device {} does not exist ({} visible)", options_.device, devices)};
  if (const std::string why = kc::kernel_image_problem(options_.device); !why.empty())
    return Error{"cuda engine: " + why};
  CUDA_TRY(cudaSetDevice(options_.device), "select device");
  CUDA_TRY(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking), "create stream");
  stream_owner_.reset(stream_, [](cudaStream_t stream) { cudaStreamDestroy(stream); });
  if (cublasCreate(&cublas_) != CUBLAS_STATUS_SUCCESS) return Error{"cuda engine: cuBLAS initialisation failed"};
  cublasSetStream(cublas_, stream_);
  if (!cublas_workspace_.reserve(kCublasWorkspaceBytes)) return Error{"cuda engine: out of GPU memory"};
  cublasSetWorkspace(cublas_, cublas_workspace_.as(), kCublasWorkspaceBytes);
  device_name_ = kc::device_description(options_.device);

  try {  // the storage allocates its chunk table; errors are returned, never thrown
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
  const size_t tables = size_t(c.n_layers) * size_t(c.n_kv_heads), nkv = size_t(c.n_kv_heads);
  bound_sync_.assign(tables, PageBoundSync{});
  if (auto s = ensure_staging_slots(1); !s) return s;
  if (!head_active_.reserve(size_t(c.n_heads)) ||
      !key_mass_.reserve(nkv * size_t(max_context_) * 4) || !head_norms_.reserve(size_t(2 * c.n_heads) * 4) ||
      !retention_budgets_.reserve(nkv * 3 * 4) || !host_retention_budgets_.reserve(nkv * 3 * 4) ||
      !retention_counts_.reserve(nkv * 4))
    return Error{"cuda engine: out of GPU memory for the page tables"};
  return ensure_workspace(kMinWorkspaceRows);
}

Status CudaBackend::ensure_staging_slots(int32_t slots) {
  if (slots <= staging_slots_) return ok_status();
  // Queued uploads may still read the pinned regions, and kernels the device ones.
  CUDA_TRY(cudaStreamSynchronize(stream_), "staging slots");
  drop_graphs();
  const size_t tables = size_t(slots) * size_t(config_.n_layers) * size_t(config_.n_kv_heads);
  staging_slots_ = 0;
  table_sync_.assign(tables, TableSync{});  // the new regions hold no table yet
  if (!tables_.reserve(tables * size_t(max_pages_) * 4) || !host_tables_.reserve(tables * size_t(max_pages_) * 4) ||
      !n_cached_.reserve(tables * 4) || !host_n_cached_.reserve(tables * 4))
    return Error{fmt::format("cuda engine: out of GPU memory for the page tables of {} sequences", slots)};
  staging_slots_ = slots;
  const int64_t capacity = plan_capacity_;
  plan_capacity_ = 0;  // the key-plan regions, again for every slot
  return ensure_plan_capacity(capacity);
}

Status CudaBackend::ensure_workspace(int64_t n) {
  n = std::max(n, kMinWorkspaceRows);
  if (n <= workspace_rows_) return ok_status();
  const ModelConfig& c = config_;
  const size_t el = size_t(kernels::dtype_bytes(dtype_)), rows = size_t(n);
  // Before any reserve: a buffer that moves, or fails and is left empty, must
  // neither stay in a graph nor pass for a valid workspace on the next call.
  drop_graphs();
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
  if (auto s = reserve_adapter_workspace(n); !s) return s;
  workspace_rows_ = n;
  return ok_status();
}

void CudaBackend::drop_graphs() {
  for (auto& [key, graph] : graphs_)
    if (graph.exec != nullptr) cudaGraphExecDestroy(graph.exec);
  graphs_.clear();
}

Result<std::shared_ptr<KvPagePool>> CudaBackend::make_bit_plane_pool(kernels::BitPlanes planes) {
  try {  // chunks of about 32 MiB, as the default pool's
    const int64_t page_bytes = 2 * int64_t(options_.page_size) * kernels::bit_plane_row_bytes(config_.head_dim, planes);
    const int32_t pages_per_chunk = int32_t(std::max<int64_t>(256, (int64_t(32) << 20) / page_bytes));
    return std::make_shared<KvPagePool>(pool_->shape(), pages_per_chunk,
                                        make_cuda_bit_plane_storage(planes, dtype_, stream_owner_));
  } catch (const std::bad_alloc&) {
    return Error{"cuda engine: out of GPU memory for a bit-plane KV pool"};
  }
}

std::string CudaBackend::device_description() const {
  return fmt::format("cuda: {}, {}", device_name_, kernels::dtype_name(dtype_));
}

std::unique_ptr<BackendKvView> CudaBackend::kv_view(const KvSequence& seq) const {
  return std::make_unique<DeviceKvView>(seq, stream_);
}

Status CudaBackend::download(const void* device, size_t bytes, void* host) {
  CUDA_TRY(cudaMemcpyAsync(host, device, bytes, cudaMemcpyDeviceToHost, stream_), "download for a method hook");
  CUDA_TRY(cudaStreamSynchronize(stream_), "download for a method hook");
  return ok_status();
}

Status CudaBackend::begin_call(const CallSetup& call) {
  const int64_t n = int64_t(call.tokens.size());
  // A failed call may have returned with uploads from the pinned staging
  // buffers still queued; this call rewrites them.
  CUDA_TRY(cudaStreamSynchronize(stream_), "forward");
  events_used_ = 0;  // pairs a failed call left unfinished are not counted
  if (auto s = ensure_workspace(n); !s) return s;
  if (auto s = call_positions(call, host_positions_, "cuda"); !s) return s;
  n_ = n;
  call_rows_ = n;
  cache_positions_ = call.cache_positions;
  first_position_ = call.first_position;
  sequence_retention_started_ = false;
  // A segment a failed call left focused is not this call's.
  segments_.assign(call.segments.begin(), call.segments.end());
  segment_retention_started_.assign(segments_.size(), 0);
  if (auto s = ensure_staging_slots(std::max<int32_t>(1, int32_t(segments_.size()))); !s) return s;
  focused_ = -1;
  focus_row_ = 0;
  stashed_rows_.assign(segments_.size(), 0);  // a segment's stash is this call's alone
  if (exit_active_) {  // an exit state slot per segment (set_exit_policy made the first)
    const size_t slots = std::max<size_t>(segments_.size(), 1);
    if (auto s = grow(exit_state_, slots * size_t(config_.n_embd) * 4, "the exit states of a batched call"); !s)
      return s;
    exit_state_kept_.assign(slots, 0);
  }
  int32_t* staged = host_small_.as<int32_t>();  // (2, n): ids, positions
  for (int64_t i = 0; i < n; ++i) {
    staged[i] = call.tokens[size_t(i)];
    staged[n + i] = host_positions_[size_t(i)];
  }
  CUDA_TRY(cudaMemcpyAsync(ids_.as(), staged, size_t(n) * 4, cudaMemcpyHostToDevice, stream_), "upload ids");
  CUDA_TRY(cudaMemcpyAsync(positions_.as(), staged + n, size_t(n) * 4, cudaMemcpyHostToDevice, stream_),
           "upload positions");
  return ok_status();
}

// A segment's rows become the call as the per-sequence ops see it: they read
// and write the workspace from its first row, so its rotated queries and keys
// and its attention output are already among the call's rows at unfocus, and
// nothing is copied either way.
Status CudaBackend::focus_segment(int32_t segment) {
  if (focused_ >= 0 || segment < 0 || segment >= int32_t(segments_.size()))
    return Error{fmt::format("cuda backend: segment {} of a call with {} cannot be focused{}", segment,
                             segments_.size(), focused_ >= 0 ? " (another is)" : "")};
  const CallSegment& seg = segments_[size_t(segment)];
  whole_ = {n_, call_rows_, first_position_, sequence_retention_started_};
  focus_row_ = seg.row_from;
  n_ = seg.rows;
  call_rows_ = seg.rows;
  first_position_ = seg.first_position;
  // Its new positions are reset once per call, at its first layer, as alone.
  sequence_retention_started_ = segment_retention_started_[size_t(segment)] != 0;
  focused_ = segment;
  return ok_status();
}

Status CudaBackend::unfocus_segment() {
  if (focused_ < 0) return Error{"cuda backend: no segment is focused"};
  segment_retention_started_[size_t(focused_)] = uint8_t(sequence_retention_started_);
  n_ = whole_.n;
  call_rows_ = whole_.call_rows;
  first_position_ = whole_.first_position;
  sequence_retention_started_ = whole_.retention_started;
  focus_row_ = 0;
  focused_ = -1;
  return ok_status();
}

// The focused segment's residual rows into its own buffer or back, on the
// stream (ordered after the ops that wrote them and before those that read
// them); no graph captures it, so a buffer may grow here.
Status CudaBackend::stash_segment(bool restore) {
  if (focused_ < 0) return Error{"cuda backend: no segment is focused to stash"};
  if (capturing_) return Error{"cuda backend: a segment stashed inside a graph capture"};
  const size_t seg = size_t(focused_), bytes = size_t(n_) * size_t(config_.n_embd) * 4;
  float* rows = sequence_rows(x_, config_.n_embd);
  if (restore) {
    if (seg >= stashed_rows_.size() || stashed_rows_[seg] != n_ || stashed_[seg].bytes() < bytes)
      return Error{fmt::format("cuda backend: segment {} has nothing stashed", seg)};
    CUDA_TRY(cudaMemcpyAsync(rows, stashed_[seg].as(), bytes, cudaMemcpyDeviceToDevice, stream_), "restore a segment");
    return ok_status();
  }
  if (stashed_.size() <= seg) stashed_.resize(seg + 1);
  if (stashed_rows_.size() <= seg) stashed_rows_.resize(seg + 1, 0);
  stashed_rows_[seg] = 0;
  // Growing frees the old buffer (cudaFree waits for the device), contents lost.
  if (!stashed_[seg].reserve(bytes))
    return Error{fmt::format("cuda engine: out of GPU memory to stash a segment of {} rows", n_)};
  CUDA_TRY(cudaMemcpyAsync(stashed_[seg].as(), rows, bytes, cudaMemcpyDeviceToDevice, stream_), "stash a segment");
  stashed_rows_[seg] = n_;
  return ok_status();
}

Status CudaBackend::end_call(double& attention_seconds) {
  if (auto s = join_predictions(); !s) return s;
  CUDA_TRY(cudaStreamSynchronize(stream_), "forward");
  attention_seconds = 0;
  // Every recorded pair has completed.
  for (size_t i = 0; i + 1 < events_used_; i += 2) {
    float ms = 0;
    if (cudaEventElapsedTime(&ms, events_[i], events_[i + 1]) == cudaSuccess) attention_seconds += ms * 1e-3;
  }
  events_used_ = 0;
  return ok_status();
}

Status CudaBackend::next_event_pair(cudaEvent_t*& pair) {
  pair = nullptr;
  if (!time_attention_ || capturing_) return ok_status();
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

}  // namespace inferlab
