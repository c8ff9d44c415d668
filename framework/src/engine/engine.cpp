#include "engine/engine.h"

#include <fmt/format.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <filesystem>

#include "cpu/cpu_ops.h"
#include "cpu/early_exit.h"
#include "cpu/predictors.h"
#include "engine/backend_factory.h"
#include "engine/device.h"
#include "engine/forward_pass.h"
#include "formats/lora_file.h"

namespace inferlab {

const char* backend_name(BackendKind backend) { return backend == BackendKind::Cuda ? "cuda" : "cpu"; }

Result<BackendKind> parse_backend(const std::string& name) {
  if (name == "cpu") return BackendKind::Cpu;
  if (name == "cuda") {
    if (!cuda_compiled())
      return Error{"backend \"cuda\": this build has no CUDA backend (rebuild with -DINFERLAB_CUDA=ON); use \"cpu\""};
    if (cuda_device_count() == 0) return Error{"backend \"cuda\": no CUDA GPU is visible on this machine; use \"cpu\""};
    return BackendKind::Cuda;
  }
  if (name == "auto") return cuda_compiled() && cuda_device_count() > 0 ? BackendKind::Cuda : BackendKind::Cpu;
  return Error{fmt::format("backend \"{}\" is not one of cpu, cuda, auto", name)};
}

Result<GpuDType> parse_gpu_dtype(const std::string& name) {
  if (name == "f16" || name == "fp16" || name == "float16") return GpuDType::F16;
  if (name == "bf16" || name == "bfloat16") return GpuDType::BF16;
  return Error{fmt::format("dtype \"{}\" is not one of f16, bf16", name)};
}

Result<KvDType> parse_kv_dtype(const std::string& name) {
  if (name == "auto") return KvDType::Auto;
  if (name == "f32") return KvDType::F32;
  if (name == "f16") return KvDType::F16;
  if (name == "bf16") return KvDType::BF16;
  return Error{fmt::format("KV dtype \"{}\" is not one of auto, f32, f16, bf16", name)};
}

const char* kv_dtype_name(KvDType dtype) {
  switch (dtype) {
    case KvDType::F32: return "f32";
    case KvDType::F16: return "f16";
    case KvDType::BF16: return "bf16";
    default: return "auto";
  }
}

const char* weight_source_name(WeightSource source) { return source == WeightSource::File ? "file" : "f32"; }

Result<WeightSource> parse_weight_source(const std::string& name) {
  if (name == "f32") return WeightSource::F32;
  if (name == "file") return WeightSource::File;
  return Error{fmt::format("weights \"{}\" is not one of f32, file", name)};
}

Status call_positions(const CallSetup& call, std::vector<int32_t>& positions, const char* backend) {
  const int64_t n = int64_t(call.tokens.size());
  positions.resize(size_t(n));
  if (call.segments.empty()) {
    for (int64_t i = 0; i < n; ++i) positions[size_t(i)] = call.first_position + int32_t(i);
    return ok_status();
  }
  int64_t covered = 0;
  for (const CallSegment& seg : call.segments) {
    if (seg.row_from != covered || seg.rows <= 0 || covered + seg.rows > n)
      return Error{fmt::format("{} backend: batched call segments must cover the call's {} rows in order", backend, n)};
    for (int32_t i = 0; i < seg.rows; ++i) positions[size_t(seg.row_from + i)] = seg.first_position + i;
    covered += seg.rows;
  }
  if (covered != n)
    return Error{fmt::format("{} backend: batched call segments cover {} of the call's {} rows", backend, covered, n)};
  return ok_status();
}

const char* feature_name(Feature f) {
  switch (f) {
    case Feature::TokenSelection: return "decode selection of tokens";
    case Feature::PageSelection: return "decode selection of pages";
    case Feature::BoundSelection: return "page selection by key bound";
    case Feature::QueryHeadSelection: return "key selection per query head";
    case Feature::SparsePrefill: return "sparse prefill (estimated, ranges and columns)";
    case Feature::AttentionStatistics: return "attention statistics on the host";
    case Feature::Eviction: return "KV eviction";
    case Feature::CachePositions: return "RoPE at cache positions";
    case Feature::LayerSkip: return "layer skipping";
    case Feature::ExitConfidence: return "early exit by confidence";
    case Feature::HeadMask: return "head masks";
    case Feature::NeuronSubset: return "FFN neuron subsets";
    case Feature::Retention: return "engine-side retention";
    case Feature::RetentionPerSequence: return "engine-side retention per sequence";
    case Feature::ValuePruning: return "local value pruning";
    case Feature::WeightReplace: return "per-run weight replacement";
    case Feature::WeightAdapters: return "unmerged low-rank adapters";
    case Feature::WeightStorage4Bit: return "weights stored in 4 bits (NF4, FP4, Int4)";
    case Feature::KvPagesF32: return "KV pages in f32";
    case Feature::KvPagesF16: return "KV pages in f16";
    case Feature::KvPagesBF16: return "KV pages in bf16";
    case Feature::KvBitPlanes: return "bit-plane KV pages (progressive quantization)";
    case Feature::ActivationSparsity: return "activation sparsity";
    case Feature::PredictedComponents: return "predicted components";
    case Feature::BatchedCalls: return "batched calls";
    case Feature::Graphs: return "graph capture";
  }
  return "?";
}

namespace {
constexpr const char* kProjNames[kProjCount] = {"attn_q", "attn_k", "attn_v", "attn_output",
                                                "ffn_gate", "ffn_up", "ffn_down", "output"};
}  // namespace

const char* proj_name(Proj p) { return kProjNames[int32_t(p)]; }

Result<Proj> parse_proj(const std::string& name) {
  for (int32_t i = 0; i < kProjCount; ++i)
    if (name == kProjNames[i]) return Proj(i);
  return Error{fmt::format("\"{}\" is not a projection (attn_q, attn_k, attn_v, attn_output, ffn_gate, ffn_up, "
                           "ffn_down, output)",
                           name)};
}

// (out, in) of a projection.
std::pair<int64_t, int64_t> proj_shape(const ModelConfig& c, Proj p) {
  switch (p) {
    case Proj::Q: return {c.q_dim(), c.n_embd};
    case Proj::K:
    case Proj::V: return {c.kv_dim(), c.n_embd};
    case Proj::O: return {c.n_embd, c.q_dim()};
    case Proj::Gate:
    case Proj::Up: return {c.n_ff, c.n_embd};
    case Proj::Down: return {c.n_embd, c.n_ff};
    case Proj::Output: return {c.n_vocab, c.n_embd};
  }
  return {0, 0};
}

namespace {
std::atomic<uint64_t> next_overrides_serial{1};
}  // namespace

WeightOverrides::WeightOverrides() : serial(next_overrides_serial++) {}

// The projection an edit names, checked against the model: `what` is
// "weight replacement of", "adapter on", ... for the message.
Result<Proj> WeightOverrides::target(const char* what, const std::string& tensor, int32_t layer) const {
  auto proj = parse_proj(tensor);
  if (!proj) return Error{fmt::format("{} {}", what, proj.message())};
  if (config == nullptr) return Error{fmt::format("{} {}: no model to check against", what, tensor)};
  const bool global = *proj == Proj::Output;
  if (global ? layer != -1 : (layer < 0 || layer >= config->n_layers))
    return Error{fmt::format("{} {}: layer {} is not {}", what, tensor, layer,
                             global ? "-1 (a global tensor)" : fmt::format("in 0..{}", config->n_layers - 1))};
  return *proj;
}

Status WeightOverrides::replace(const std::string& tensor, int32_t layer, std::span<const float> data) {
  auto proj = target("weight replacement of", tensor, layer);
  if (!proj) return proj.error();
  const auto [out, in] = proj_shape(*config, *proj);
  if (int64_t(data.size()) != out * in)
    return Error{fmt::format("weight replacement of {} (layer {}): {} values given, the tensor has {} x {} = {}",
                             tensor, layer, data.size(), out, in, out * in)};
  for (float x : data)
    if (!std::isfinite(x)) return Error{fmt::format("weight replacement of {} (layer {}): a value is not finite", tensor, layer)};
  std::erase_if(items, [&](const WeightOverride& o) { return o.proj == *proj && o.layer == layer; });
  items.push_back({*proj, layer, std::vector<float>(data.begin(), data.end())});
  serial = next_overrides_serial++;
  return ok_status();
}

// The shape a plugin sees of a model (context and page size: the engine's).
ModelShape model_shape(const ModelConfig& c, int32_t context, int32_t page_size) {
  return ModelShape{c.n_layers, c.n_heads, c.n_kv_heads, c.head_dim, c.n_embd, c.n_ff, c.n_vocab, context, page_size};
}

Status WeightOverrides::load_adapter(const std::string& path, float scale, bool merge) {
  if (config == nullptr) return Error{fmt::format("{}: no model to apply the adapter to", path)};
  auto found = read_lora_adapter(path, *config);
  if (!found) return found.error();
  if (!std::isfinite(scale)) return Error{fmt::format("{}: the scale {} is not finite", path, scale)};
  // All or nothing: the edits so far come back if one adapter is refused.
  const auto saved_items = items;
  const auto saved_adapters = adapters;
  for (auto& p : *found) {
    p.adapter.scale *= scale;
    p.adapter.merge = merge;
    if (auto s = add_adapter(p.tensor, p.layer, p.adapter); !s) {
      items = saved_items;
      adapters = saved_adapters;
      return Error{fmt::format("{}: {}", path, s.message())};
    }
  }
  return ok_status();
}

Status WeightOverrides::add_adapter(const std::string& tensor, int32_t layer, const LowRankAdapter& adapter) {
  auto proj = target("adapter on", tensor, layer);
  if (!proj) return proj.error();
  const bool global = *proj == Proj::Output;
  const auto [out, in] = proj_shape(*config, *proj);
  const int64_t r = adapter.rank;
  if (r <= 0 || r > std::min(out, in))
    return Error{fmt::format("adapter on {} (layer {}): rank {} is not in 1..{}", tensor, layer, r, std::min(out, in))};
  if (int64_t(adapter.a.size()) != r * in || int64_t(adapter.b.size()) != out * r)
    return Error{fmt::format("adapter on {} (layer {}): A has {} values and B {}; rank {} needs A {} x {} = {} and "
                             "B {} x {} = {}",
                             tensor, layer, adapter.a.size(), adapter.b.size(), r, r, in, r * in, out, r, out * r)};
  auto finite = [](const std::vector<float>& v) {
    return std::all_of(v.begin(), v.end(), [](float x) { return std::isfinite(x); });
  };
  if (!finite(adapter.a) || !finite(adapter.b) || !std::isfinite(adapter.scale))
    return Error{fmt::format("adapter on {} (layer {}): a value is not finite", tensor, layer)};
  if (adapter.merge) {  // W + scale * B A into this run's copy of W
    std::vector<float> w;
    auto replaced = std::find_if(items.begin(), items.end(),
                                 [&](const WeightOverride& o) { return o.proj == *proj && o.layer == layer; });
    if (replaced != items.end()) {
      w = replaced->data;
    } else {
      if (base == nullptr) return Error{fmt::format("adapter on {} (layer {}): merging needs the model's weights", tensor, layer)};
      const auto src = base->tensor(tensor, layer);
      if (int64_t(src.size()) != out * in)
        return Error{fmt::format("adapter on {} (layer {}): the model's weight is not available to merge into", tensor,
                                 layer)};
      w.assign(src.begin(), src.end());
    }
    for (int64_t o = 0; o < out; ++o)
      for (int64_t k = 0; k < r; ++k) {
        const float s = adapter.scale * adapter.b[size_t(o * r + k)];
        if (s == 0.0f) continue;
        const float* a = &adapter.a[size_t(k * in)];
        float* row = &w[size_t(o * in)];
        for (int64_t i = 0; i < in; ++i) row[i] += s * a[i];
      }
    return replace(tensor, layer, w);
  }
  if (global)
    return Error{fmt::format("adapter on {}: the output projection takes merged adapters only (merge = true)", tensor)};
  auto it = std::find_if(adapters.begin(), adapters.end(),
                         [&](const WeightAdapter& x) { return x.proj == *proj && x.layer == layer; });
  if (it == adapters.end()) it = adapters.insert(adapters.end(), WeightAdapter{*proj, layer, 0, {}, {}});
  // A stacked below the earlier adapters' rows; B's rows widened by r columns.
  it->a.insert(it->a.end(), adapter.a.begin(), adapter.a.end());
  std::vector<float> b(size_t(out * (it->rank + r)));
  for (int64_t o = 0; o < out; ++o) {
    std::copy_n(it->b.begin() + o * it->rank, it->rank, b.begin() + o * (it->rank + r));
    for (int64_t k = 0; k < r; ++k) b[size_t(o * (it->rank + r) + it->rank + k)] = adapter.scale * adapter.b[size_t(o * r + k)];
  }
  it->b = std::move(b);
  it->rank += int32_t(r);
  serial = next_overrides_serial++;
  return ok_status();
}

Status WeightOverrides::set_storage(const std::string& tensor, int32_t layer, const WeightStorage& storage) {
  if (tensor == "output")
    return Error{fmt::format("weight storage of {}: the output projection keeps the model's (as QLoRA keeps it)", tensor)};
  auto proj = target("weight storage of", tensor, layer);
  if (!proj) return proj.error();
  if (int32_t(storage.format) < int32_t(WeightFormat::Model) || int32_t(storage.format) > int32_t(WeightFormat::Int4))
    return Error{fmt::format("weight storage of {} (layer {}): unknown format {}", tensor, layer, int32_t(storage.format))};
  if (storage.format != WeightFormat::Model &&
      (storage.block_size < 2 || storage.block_size > 4096 || storage.block_size % 2 != 0))
    return Error{fmt::format("weight storage of {} (layer {}): block size {} is not an even number in 2..4096", tensor,
                             layer, storage.block_size)};
  std::erase_if(storages, [&](const WeightStorageItem& s) { return s.proj == *proj && s.layer == layer; });
  if (storage.format != WeightFormat::Model) storages.push_back({*proj, layer, storage});
  serial = next_overrides_serial++;
  return ok_status();
}

Result<std::unique_ptr<Engine>> Engine::create(std::shared_ptr<const Model> model, EngineOptions options) {
  if (!model) return Error{"engine: no model"};
  if (options.page_size <= 0 || options.page_size > 65536)
    return Error{fmt::format("engine: page_size {} is out of range (1..65536)", options.page_size)};
  if (options.max_context < 0) return Error{fmt::format("engine: max_context {} is negative", options.max_context)};
  if (options.n_threads < 0) return Error{fmt::format("engine: n_threads {} is negative", options.n_threads)};
  if (options.weights == WeightSource::File && options.backend != BackendKind::Cpu)
    return Error{"engine: weights = file (the model's quantized blocks) runs on the CPU backend only; "
                 "the CUDA backend computes in f16 or bf16 (model.dtype)"};
  if (options.weights == WeightSource::File && !model->adapter_digest().empty())
    return Error{"engine: weights = file computes from the file's quantized blocks, which do not hold the adapter "
                 "merged into this model (model.adapter); use weights = f32"};
  if (options.backend == BackendKind::Cuda && options.kv_dtype != KvDType::Auto &&
      options.kv_dtype != (options.gpu_dtype == GpuDType::BF16 ? KvDType::BF16 : KvDType::F16))
    return Error{fmt::format("engine: the CUDA backend stores the KV cache in its compute type ({}), not {}",
                             options.gpu_dtype == GpuDType::BF16 ? "bf16" : "f16", kv_dtype_name(options.kv_dtype))};
  const int32_t max_context = options.max_context > 0 ? options.max_context : model->config().context_length;
  auto backend = options.backend == BackendKind::Cpu ? make_cpu_backend(model, options, max_context)
                                                     : make_cuda_backend(model, options, max_context);
  if (!backend) return backend.error();
  return std::unique_ptr<Engine>(new Engine(std::move(model), options, std::move(*backend)));
}

Result<std::unique_ptr<Engine>> Engine::create_random(const ModelConfig& config, uint64_t seed, EngineOptions options) {
  if (options.backend != BackendKind::Cuda) return Error{"engine: random weights are made on the GPU (backend cuda)"};
  std::shared_ptr<const Model> model = Model::shape_only(config, fmt::format("random:{}:seed{}", config.name, seed));
  const int32_t max_context = options.max_context > 0 ? options.max_context : config.context_length;
  auto backend = make_cuda_random_backend(model, options, max_context, seed);
  if (!backend) return backend.error();
  return std::unique_ptr<Engine>(new Engine(std::move(model), options, std::move(*backend)));
}

Engine::Engine(std::shared_ptr<const Model> model, EngineOptions options, std::unique_ptr<Backend> backend)
    : model_(std::move(model)), options_(options), backend_(std::move(backend)) {
  max_context_ = options_.max_context > 0 ? options_.max_context : model_->config().context_length;
  pool_ = default_pool_ = backend_->pool();
}

Engine::~Engine() {
  pool_.reset();
  default_pool_.reset();
  method_pools_.clear();
  backend_.reset();
}

void Engine::set_time_attention(bool on) {
  options_.time_attention = on;
  backend_->set_time_attention(on);
}

// A projection's float32 weight as the model has it (empty for a shape-only model).
static std::span<const float> model_weight(const Model& model, Proj p, int32_t layer) {
  const ModelWeights& w = model.weights();
  if (p == Proj::Output) return w.output.empty() ? std::span<const float>(w.token_embd) : std::span<const float>(w.output);
  if (size_t(layer) >= w.layers.size()) return {};
  const LayerWeights& lw = w.layers[size_t(layer)];
  switch (p) {
    case Proj::Q: return lw.wq;
    case Proj::K: return lw.wk;
    case Proj::V: return lw.wv;
    case Proj::O: return lw.wo;
    case Proj::Gate: return lw.w_gate;
    case Proj::Up: return lw.w_up;
    case Proj::Down: return lw.w_down;
    case Proj::Output: break;
  }
  return {};
}

std::vector<Feature> method_features(const Method& method, uint32_t hooks, const ComponentPredictors& predictors,
                                     const ExitPolicy& exits) {
  std::vector<Feature> out;
  auto need = [&](uint32_t hook, std::initializer_list<Feature> features) {
    if ((hooks & hook) != 0) out.insert(out.end(), features);
  };
  need(kHookDecodeSelection, {Feature::TokenSelection, Feature::PageSelection});
  need(kHookPageBudget, {Feature::BoundSelection});
  need(kHookPrefillPattern, {Feature::SparsePrefill});
  need(kHookAttentionFeedback, {Feature::AttentionStatistics});
  need(kHookEviction, {Feature::Eviction});
  need(kHookLayerPlan, {Feature::LayerSkip});
  need(kHookComponentMask, {Feature::HeadMask, Feature::NeuronSubset});
  need(kHookRetention, {Feature::Retention, Feature::Eviction});
  if ((hooks & kHookRetention) != 0 && method.retention_policy().scope == RetentionScope::PerSequence)
    out.push_back(Feature::RetentionPerSequence);
  if ((hooks & kHookPageBudget) != 0 && method.bound_scope() == BoundScope::QueryHead)
    out.push_back(Feature::QueryHeadSelection);
  if (method.kv_positions() == KvPositions::Cache) out.push_back(Feature::CachePositions);
  if (method.value_pruning().active()) out.push_back(Feature::ValuePruning);
  if (method.activation_sparsity().active()) out.push_back(Feature::ActivationSparsity);
  if (predictors.active()) out.push_back(Feature::PredictedComponents);
  if (exits.active()) out.push_back(Feature::ExitConfidence);
  if (method.speculation().active()) out.push_back(Feature::LayerSkip);  // draft steps skip the layers above
  switch (method.kv_page_format()) {
    case KvPageFormat::Any: break;
    case KvPageFormat::F32: out.push_back(Feature::KvPagesF32); break;
    case KvPageFormat::F16: out.push_back(Feature::KvPagesF16); break;
    case KvPageFormat::BF16: out.push_back(Feature::KvPagesBF16); break;
    case KvPageFormat::BitPlanes: out.push_back(Feature::KvBitPlanes); break;
  }
  if (method.kv_quantization().active() && method.kv_page_format() != KvPageFormat::BitPlanes)
    out.push_back(Feature::KvBitPlanes);
  return out;
}

namespace {

// A method's activation sparsity fits the model: one entry per layer, no NaN.
Status check_activation_sparsity(const ActivationSparsity& a, const ModelConfig& c, uint32_t hooks,
                                 const std::string& name) {
  if (!a.active()) return ok_status();
  if (!a.input_threshold.empty() && int64_t(a.input_threshold.size()) != c.n_layers)
    return Error{fmt::format("method {}: activation sparsity has input thresholds for {} layers; the model has {}",
                             name, a.input_threshold.size(), c.n_layers)};
  if (!a.gate_threshold.empty() && int64_t(a.gate_threshold.size()) != c.n_layers)
    return Error{fmt::format("method {}: activation sparsity has gate thresholds for {} layers; the model has {}", name,
                             a.gate_threshold.size(), c.n_layers)};
  for (size_t l = 0; l < a.input_threshold.size(); ++l)
    for (const float t : a.input_threshold[l])
      if (std::isnan(t)) return Error{fmt::format("method {}: an input threshold of layer {} is NaN", name, l)};
  for (size_t l = 0; l < a.gate_threshold.size(); ++l)
    if (std::isnan(a.gate_threshold[l])) return Error{fmt::format("method {}: the gate threshold of layer {} is NaN", name, l)};
  if ((hooks & kHookComponentMask) != 0)
    return Error{fmt::format("method {}: activation sparsity with component masks (mask_components) is not supported",
                             name)};
  return ok_status();
}

// A method's predictors fit the model: one entry per layer, keep within the
// outputs, weights of the stated shapes and finite; not beside other ways of
// choosing components.
Status check_predictors(const ComponentPredictors& p, const ModelConfig& c, uint32_t hooks, bool sparsity,
                        const std::string& name) {
  if (!p.active()) return ok_status();
  if (!(p.norm_eps > 0.0f) || !std::isfinite(p.norm_eps))
    return Error{fmt::format("method {}: component predictors' norm_eps {} must be positive", name, p.norm_eps)};
  if ((hooks & kHookComponentMask) != 0)
    return Error{fmt::format("method {}: component predictors with component masks (mask_components) are not "
                             "supported", name)};
  if (sparsity)
    return Error{fmt::format("method {}: component predictors with activation sparsity are not supported", name)};
  for (const bool neurons : {true, false}) {
    const auto& list = neurons ? p.neurons : p.heads;
    const char* what = neurons ? "neuron" : "head";
    const int64_t out = neurons ? c.n_ff : c.n_heads;
    if (!list.empty() && int64_t(list.size()) != c.n_layers)
      return Error{fmt::format("method {}: {} predictors for {} layers; the model has {}", name, what, list.size(),
                               c.n_layers)};
    for (size_t l = 0; l < list.size(); ++l) {
      const LowRankPredictor& q = list[l];
      if (q.keep < 0 || q.keep > out)
        return Error{fmt::format("method {}: the {} predictor of layer {} keeps {} of {}", name, what, l, q.keep, out)};
      if (!q.present()) continue;
      const int64_t hidden = q.rank > 0 ? q.rank : c.n_embd;
      if (q.rank < 0 || (q.relu && q.rank == 0) || int64_t(q.w1.size()) != int64_t(q.rank) * c.n_embd ||
          int64_t(q.w2.size()) != out * hidden || (!q.b2.empty() && int64_t(q.b2.size()) != out))
        return Error{fmt::format("method {}: the {} predictor of layer {} has rank {} and {}/{}/{} weights; this "
                                 "model needs w1 (rank, {}), w2 ({}, rank or {}), b2 ({}) or none{}",
                                 name, what, l, q.rank, q.w1.size(), q.w2.size(), q.b2.size(), c.n_embd, out, c.n_embd,
                                 out, q.relu && q.rank == 0 ? ", and ReLU needs rank > 0" : "")};
      for (const auto* w : {&q.w1, &q.w2, &q.b2})
        for (const float v : *w)
          if (!std::isfinite(v))
            return Error{fmt::format("method {}: the {} predictor of layer {} has a weight that is not finite", name,
                                     what, l)};
    }
  }
  return ok_status();
}

// A method's exit policy fits the model: a flag per layer (none on the last),
// exit heads (n_embd, n_embd) and, for the classifier measure, a classifier
// (2, n_embd) at every checked layer; finite weights; the threshold hook.
Status check_exit_policy(const ExitPolicy& p, const ModelConfig& c, uint32_t hooks, const std::string& name) {
  if (!p.active()) return ok_status();
  const int64_t L = c.n_layers, d = c.n_embd;
  if ((hooks & kHookExitConfidence) == 0)
    return Error{fmt::format("method {}: an exit policy needs the exit_threshold hook", name)};
  if (int64_t(p.check.size()) != L)
    return Error{fmt::format("method {}: the exit policy checks {} layers; the model has {}", name, p.check.size(), L)};
  if (p.check.back() != 0)
    return Error{fmt::format("method {}: the exit policy checks after the last layer ({}), where nothing is left to "
                             "skip", name, L - 1)};
  if (!(p.norm_eps > 0.0f) || !std::isfinite(p.norm_eps))
    return Error{fmt::format("method {}: the exit policy's norm_eps {} must be positive", name, p.norm_eps)};
  if (int32_t(p.measure) < 0 || int32_t(p.measure) > int32_t(ExitMeasure::Classifier))
    return Error{fmt::format("method {}: unknown exit measure {}", name, int32_t(p.measure))};
  auto check_maps = [&](const std::vector<ExitMap>& maps, int64_t out, const char* what, bool every_check) -> Status {
    if (!maps.empty() && int64_t(maps.size()) != L)
      return Error{fmt::format("method {}: {} for {} layers; the model has {}", name, what, maps.size(), L)};
    for (int64_t l = 0; l < L; ++l) {
      const ExitMap* m = maps.empty() ? nullptr : &maps[size_t(l)];
      if (every_check && p.check[size_t(l)] != 0 && (m == nullptr || !m->present()))
        return Error{fmt::format("method {}: the classifier measure needs a classifier at checked layer {}", name, l)};
      if (m == nullptr || !m->present()) continue;
      if (int64_t(m->weight.size()) != out * d || (!m->bias.empty() && int64_t(m->bias.size()) != out))
        return Error{fmt::format("method {}: the {} of layer {} has {} weights and {} biases; this model needs ({}, "
                                 "{}) and {} or none", name, what, l, m->weight.size(), m->bias.size(), out, d, out)};
      for (const auto* w : {&m->weight, &m->bias})
        for (const float v : *w)
          if (!std::isfinite(v))
            return Error{fmt::format("method {}: the {} of layer {} has a weight that is not finite", name, what, l)};
    }
    return ok_status();
  };
  if (auto s = check_maps(p.heads, d, "exit heads", false); !s) return s;
  return check_maps(p.classifiers, 2, "exit classifiers", p.measure == ExitMeasure::Classifier);
}

// A method's speculation fits the model, and nothing it does is lost to a truncate.
Status check_speculation(const Speculation& sp, const ModelConfig& c, uint32_t hooks, const std::string& name) {
  if (sp.exit_layer == 0 && sp.draft_length == 0) return ok_status();
  if (sp.exit_layer < 1 || sp.exit_layer >= c.n_layers)
    return Error{fmt::format("method {}: speculation drafts with {} layers; this model's drafts run 1..{} of its {} "
                             "layers", name, sp.exit_layer, c.n_layers - 1, c.n_layers)};
  if (sp.draft_length < 1 || sp.draft_length > kMaxDraftLength)
    return Error{fmt::format("method {}: speculation drafts {} tokens per verification; 1..{}", name, sp.draft_length,
                             kMaxDraftLength)};
  if ((hooks & (kHookEviction | kHookRetention)) != 0)
    return Error{fmt::format("method {}: speculation with eviction or retention: a truncate cannot bring back the "
                             "tokens a draft step dropped", name)};
  return ok_status();
}

}  // namespace

Status Engine::set_method(Method* method, uint32_t hooks, const WeightOverrides* overrides, const std::string& name) {
  if (method != nullptr) hooks &= ~method->unused_hooks();
  ComponentPredictors predictors;
  ExitPolicy exits;
  if (method != nullptr) predictors = method->component_predictors();
  if (method != nullptr) exits = method->exit_policy();
  std::vector<Feature> needed;
  if (method != nullptr) needed = method_features(*method, hooks, predictors, exits);
  if (overrides != nullptr && !overrides->items.empty()) needed.push_back(Feature::WeightReplace);
  if (overrides != nullptr && !overrides->adapters.empty()) needed.push_back(Feature::WeightAdapters);
  if (overrides != nullptr && !overrides->storages.empty()) needed.push_back(Feature::WeightStorage4Bit);
  for (Feature f : needed)
    if (!backend_->supports(f))
      return Error{fmt::format("method {} needs {}, which the {} backend does not support", name, feature_name(f),
                               backend_->name())};
  if (std::find(needed.begin(), needed.end(), Feature::QueryHeadSelection) != needed.end() &&
      config().group_size() > kMaxSelectionGroup)
    return Error{fmt::format("method {} needs key selection per query head, which takes groups of at most {} "
                             "query heads; this model has {}",
                             name, kMaxSelectionGroup, config().group_size())};
  ActivationSparsity sparsity;
  if (method != nullptr) {
    sparsity = method->activation_sparsity();
    if (auto s = check_activation_sparsity(sparsity, config(), hooks, name); !s) return s;
    if (auto s = check_predictors(predictors, config(), hooks, sparsity.active(), name); !s) return s;
    if (auto s = check_exit_policy(exits, config(), hooks, name); !s) return s;
    if (auto s = check_speculation(method->speculation(), config(), hooks, name); !s) return s;
  }
  // Bit-plane pages: the method's sequences come from a pool of its planes.
  std::shared_ptr<KvPagePool> pool = default_pool_;
  if (method != nullptr) {
    const KvQuantization quant = method->kv_quantization();
    if (!quant.active() && method->kv_page_format() == KvPageFormat::BitPlanes)
      return Error{fmt::format("method {} asks for bit-plane KV pages without saying their planes "
                               "(Method::kv_quantization)", name)};
    if (quant.active()) {
      const kernels::BitPlanes planes{quant.msb_bits, quant.lsb_bits};
      if (!kernels::bit_planes_supported(planes))
        return Error{fmt::format("method {}: bit-plane KV pages of {} MSB + {} LSB bits; the engine stores {}", name,
                                 quant.msb_bits, quant.lsb_bits, kernels::kBitPlaneWidths)};
      if (!(quant.requant_threshold >= 0.0 && quant.requant_threshold <= 1.0))
        return Error{fmt::format("method {}: requant_threshold {} is outside [0, 1]", name, quant.requant_threshold)};
      for (Feature f : {Feature::BoundSelection, Feature::SparsePrefill, Feature::CachePositions})
        if (std::find(needed.begin(), needed.end(), f) != needed.end())
          return Error{fmt::format("method {}: bit-plane KV pages do not support {} yet", name, feature_name(f))};
      auto made = backend_->bit_plane_pool(planes);
      if (!made) return Error{fmt::format("method {}: {}", name, made.message())};
      pool = *made;
      if (std::find(method_pools_.begin(), method_pools_.end(), pool) == method_pools_.end())
        method_pools_.push_back(pool);
    }
  }
  // Weights of the previous method come back before this one's go in.
  const WeightOverrides* next = method != nullptr && overrides != nullptr && !overrides->empty() ? overrides : nullptr;
  const uint64_t serial = next != nullptr ? next->serial : 0;
  if (serial != overrides_applied_) {
    for (const auto& [proj, layer] : overridden_)
      if (auto s = backend_->set_weight_override(proj, layer, {}); !s) return s;
    for (const auto& [proj, layer] : adapted_)
      if (auto s = backend_->set_weight_adapter(proj, layer, 0, {}, {}); !s) return s;
    for (const auto& [proj, layer] : stored_)
      if (auto s = backend_->set_weight_storage(proj, layer, WeightStorage{}, {}); !s) return s;
    overridden_.clear();
    adapted_.clear();
    stored_.clear();
    overrides_applied_ = 0;
    if (next != nullptr) {
      for (const auto& o : next->items) {
        if (auto s = backend_->set_weight_override(o.proj, o.layer, o.data); !s) return s;
        overridden_.emplace_back(o.proj, o.layer);
      }
      for (const auto& a : next->adapters) {
        if (auto s = backend_->set_weight_adapter(a.proj, a.layer, a.rank, a.a, a.b); !s) return s;
        adapted_.emplace_back(a.proj, a.layer);
      }
      for (const auto& st : next->storages) {  // quantized from the weight as replaced
        std::span<const float> weight = model_weight(*model_, st.proj, st.layer);
        for (const auto& o : next->items)
          if (o.proj == st.proj && o.layer == st.layer) weight = o.data;
        if (weight.empty())
          return Error{fmt::format("method {}: {} of layer {} has no host weights to quantize (a shape-only model)",
                                   name, proj_name(st.proj), st.layer)};
        if (auto s = backend_->set_weight_storage(st.proj, st.layer, st.storage, weight); !s) return s;
        stored_.emplace_back(st.proj, st.layer);
      }
    }
    overrides_applied_ = serial;
  }
  if (auto s = backend_->prepare_sparsity(sparsity); !s) return Error{fmt::format("method {}: {}", name, s.message())};
  probe_pattern_.clear();  // what layer_output prepared is gone
  PredictedLayers predicted;
  if (predictors.active()) {
    auto flags = [](const std::vector<LowRankPredictor>& list) {
      std::vector<uint8_t> out(list.size());
      for (size_t l = 0; l < list.size(); ++l) out[l] = list[l].present() ? 1 : 0;
      if (std::find(out.begin(), out.end(), uint8_t{1}) == out.end()) out.clear();
      return out;
    };
    predicted.neurons = flags(predictors.neurons);
    predicted.heads = flags(predictors.heads);
  }
  if (auto s = backend_->set_predictors(std::move(predictors)); !s) return Error{fmt::format("method {}: {}", name, s.message())};
  ExitLayout exit;
  if (exits.active()) {
    exit.measure = exits.measure;
    exit.check = exits.check;
    exit.kv_fill = exits.kv_fill;
    for (size_t l = 0; l < exits.heads.size(); ++l) {
      if (!exits.heads[l].present()) continue;
      exit.head.resize(exits.check.size(), 0);
      exit.head[l] = 1;
    }
  }
  if (auto s = backend_->set_exit_policy(std::move(exits)); !s) return Error{fmt::format("method {}: {}", name, s.message())};
  static std::atomic<uint64_t> next_instance{1};
  if (method != nullptr && method->engine_instance == 0) method->engine_instance = next_instance++;
  method_ = method;
  hooks_ = method != nullptr ? hooks : 0;
  sparsity_ = std::move(sparsity);
  predicted_ = std::move(predicted);
  exit_ = std::move(exit);
  speculation_ = method != nullptr ? method->speculation() : Speculation{};
  pool_ = std::move(pool);
  return ok_status();
}

Status Engine::predict_rows(std::span<const float> hidden, const ExitMap* head, float norm_eps,
                            std::vector<int32_t>& top1, std::vector<float>& margin) {
  const ModelConfig& c = config();
  const int64_t d = c.n_embd;
  if (method_ != nullptr) return Error{"engine: predictions from given rows only while no method is set (calibration)"};
  if (hidden.empty() || int64_t(hidden.size()) % d != 0)
    return Error{fmt::format("engine: {} hidden values are not rows of {}", hidden.size(), d)};
  if (head != nullptr && head->present() &&
      (int64_t(head->weight.size()) != d * d || (!head->bias.empty() && int64_t(head->bias.size()) != d)))
    return Error{fmt::format("engine: an exit head of {} weights and {} biases; this model needs ({}, {}) and {} or none",
                             head->weight.size(), head->bias.size(), d, d, d)};
  if (!(norm_eps > 0.0f)) return Error{fmt::format("engine: norm_eps {} must be positive", norm_eps)};
  const int64_t rows = int64_t(hidden.size()) / d;
  top1.assign(size_t(rows), 0);
  margin.assign(size_t(rows), 0.0f);
  const int64_t chunk = std::min<int64_t>(std::max(max_context_, 1), 256);
  const std::vector<int32_t> tokens(size_t(chunk), 0);  // ids are not read: the rows replace the layers' output
  std::vector<float> mapped, scaled;
  for (int64_t r0 = 0; r0 < rows; r0 += chunk) {
    const int64_t n = std::min(chunk, rows - r0);
    std::span<const float> in = hidden.subspan(size_t(r0 * d), size_t(n * d));
    if (head != nullptr && head->present()) {
      scaled.resize(size_t(n * d));
      mapped.resize(size_t(n * d));
      kernels::cpu::rms_scale_rows(scaled.data(), in.data(), n, d, norm_eps);
      kernels::cpu::predictor_layer(mapped.data(), scaled.data(), head->weight.data(),
                                    head->bias.empty() ? nullptr : head->bias.data(), n, d, d, false);
      in = mapped;
    }
    if (auto s = backend_->begin_call({std::span<const int32_t>(tokens.data(), size_t(n)), 0, false, {}}); !s) return s;
    if (auto s = backend_->write_hidden(in); !s) return s;
    auto s = backend_->logits(0, n, [&](int64_t row, std::span<const float> logits) {
      top1[size_t(r0 + row)] = int32_t(kernels::cpu::argmax(logits.data(), int64_t(logits.size())));
      margin[size_t(r0 + row)] = kernels::cpu::softmax_margin(logits.data(), int64_t(logits.size()));
    });
    double seconds = 0;
    if (auto e = backend_->end_call(seconds); s && !e) s = e;
    if (!s) return s;
  }
  return ok_status();
}

Status Engine::layer_output(int32_t layer, std::span<const float> input, int32_t window,
                            const ActivationSparsity& sparsity, std::vector<float>& output) {
  const ModelConfig& c = config();
  if (method_ != nullptr) return Error{"engine: a single layer runs only while no method is set (calibration)"};
  if (layer < 0 || layer >= c.n_layers)
    return Error{fmt::format("engine: layer {} of a model of {} layers", layer, c.n_layers)};
  const int64_t row = c.n_embd;
  if (window <= 0 || window > max_context_ || input.empty() || int64_t(input.size()) % (int64_t(window) * row) != 0)
    return Error{fmt::format("engine: {} input values are not whole windows of {} tokens of {} values (the context "
                             "holds {})",
                             input.size(), window, row, max_context_)};
  // Only this layer's thresholds, checked as a method's would be.
  ActivationSparsity own;
  if (sparsity.active()) {
    if (!sparsity.input_threshold.empty()) {
      if (sparsity.input_threshold.size() != size_t(c.n_layers))
        return Error{fmt::format("engine: input thresholds for {} layers; the model has {}",
                                 sparsity.input_threshold.size(), c.n_layers)};
      own.input_threshold.assign(size_t(c.n_layers), {-1, -1, -1, -1, -1, -1, -1});
      own.input_threshold[size_t(layer)] = sparsity.input_threshold[size_t(layer)];
    }
    if (!sparsity.gate_threshold.empty()) {
      if (sparsity.gate_threshold.size() != size_t(c.n_layers))
        return Error{fmt::format("engine: gate thresholds for {} layers; the model has {}",
                                 sparsity.gate_threshold.size(), c.n_layers)};
      own.gate_threshold.assign(size_t(c.n_layers), -1.0f);
      own.gate_threshold[size_t(layer)] = sparsity.gate_threshold[size_t(layer)];
    }
    if (auto s = check_activation_sparsity(own, c, 0, "layer probe"); !s) return s;
  }
  // What the backend reads for these thresholds (transposed copies, workspace), made once per pattern.
  std::vector<uint8_t> pattern(size_t(kSparseProjections) + 1, 0);
  for (int32_t p = 0; p < kSparseProjections; ++p) pattern[size_t(p)] = own.input(layer, p) >= 0;
  pattern.back() = own.gate(layer) >= 0;
  pattern.push_back(uint8_t(layer));
  if (pattern != probe_pattern_) {
    if (auto s = backend_->prepare_sparsity(own); !s) return s;
    probe_pattern_ = pattern;
  }
  MethodCall call;
  if (own.active()) call.sparsity = &own;
  const std::vector<int32_t> tokens(size_t(window), 0);  // ids are not read: the input replaces the embedding
  output.clear();
  output.reserve(input.size());
  std::vector<float> out;
  const size_t stride = size_t(window) * size_t(row);
  try {
    for (size_t at = 0; at < input.size(); at += stride) {
      auto seq = new_sequence();
      ForwardPass pass(*backend_, c, options_, call, counters_, *seq, tokens);
      if (auto s = pass.run_single_layer(layer, input.subspan(at, stride), out); !s) return s;
      output.insert(output.end(), out.begin(), out.end());
    }
  } catch (const std::bad_alloc&) {
    return Error{fmt::format("{}: out of memory for KV cache pages", backend_->name())};
  }
  return ok_status();
}

MethodScope::~MethodScope() { (void)engine_->set_method(nullptr, 0); }

ModelShape Engine::shape() const { return model_shape(config(), max_context_, options_.page_size); }

std::map<std::string, double> EngineCounters::as_map() const {
  std::map<std::string, double> out = {{"forward_calls", double(forward_calls)},
                                       {"decode_steps", double(decode_steps)},
                                       {"tokens_evicted", double(tokens_evicted)},
                                       {"decode_keys_read", double(decode_keys_read)},
                                       {"decode_keys_cached", double(decode_keys_cached)},
                                       {"decode_pages_read", double(decode_pages_read)},
                                       {"decode_kv_bytes_read", double(decode_kv_bytes_read)},
                                       {"layers_skipped", double(layers_skipped)},
                                       {"heads_skipped", double(heads_skipped)},
                                       {"kv_heads_skipped", double(kv_heads_skipped)},
                                       {"rows_pruned", double(rows_pruned)},
                                       {"decode_values_skipped", double(decode_values_skipped)},
                                       {"neurons_skipped", double(neurons_skipped)},
                                       {"sparse_prefill_heads", double(sparse_prefill_heads)},
                                       {"sparse_prefill_keys_read", double(sparse_prefill_keys_read)},
                                       {"sparse_prefill_keys_causal", double(sparse_prefill_keys_causal)},
                                       {"graph_replays", double(graph_replays)},
                                       {"logits_rows", double(logits_rows)}};
  if (decode_steps > 0) out["layers_per_decode_token"] = double(decode_layers_run) / double(decode_steps);
  out["kv_fills_propagated"] = double(kv_fills_propagated);
  if (batched_calls > 0 || batch_fallbacks > 0) {  // only where Engine::forward_batch ran
    out["batched_calls"] = double(batched_calls);
    out["batched_sequences"] = double(batched_sequences);
    if (batched_calls > 0) out["batched_layers_per_call"] = double(batched_layers) / double(batched_calls);
    out["batch_fallbacks"] = double(batch_fallbacks);
  }
  if (exit_checks > 0) {
    out["exit_checks"] = double(exit_checks);
    if (decode_steps > 0) out["exit_checks_per_decode_token"] = double(exit_checks) / double(decode_steps);
  }
  if (verify_calls > 0) {  // only with a method that speculates
    const int64_t accepted = drafted_tokens - drafts_rejected - drafts_unused;
    out["draft_steps"] = double(draft_steps);
    out["drafted_tokens"] = double(drafted_tokens);
    out["drafts_accepted"] = double(accepted);
    out["drafts_rejected"] = double(drafts_rejected);
    out["verify_calls"] = double(verify_calls);
    if (accepted + drafts_rejected > 0)
      out["draft_acceptance"] = double(accepted) / double(accepted + drafts_rejected);
    // Tokens each verifying call gave: its accepted drafts plus the model's own next token.
    out["tokens_per_verify_call"] = double(accepted + verify_calls) / double(verify_calls);
  }
  if (!exits_after_layer.empty()) {  // only with a method that exits
    int64_t exits = 0;
    for (size_t l = 0; l < exits_after_layer.size(); ++l) {
      exits += exits_after_layer[l];
      if (exits_after_layer[l] > 0) out[fmt::format("exits_after_layer.layer{:02d}", l)] = double(exits_after_layer[l]);
    }
    out["early_exits"] = double(exits);
  }
  if (!requant_rows.empty()) {  // only with bit-plane pages
    int64_t rows = 0, refetched = 0;
    for (size_t l = 0; l < requant_rows.size(); ++l) {
      rows += requant_rows[l];
      refetched += requant_refetched[l];
      if (requant_rows[l] > 0)
        out[fmt::format("requant_refetch_rate.layer{:02d}", l)] = double(requant_refetched[l]) / double(requant_rows[l]);
    }
    out["requant_rows"] = double(rows);
    out["requant_refetched"] = double(refetched);
    if (rows > 0) out["requant_refetch_rate"] = double(refetched) / double(rows);
    out["decode_lsb_keys_read"] = double(decode_lsb_keys_read);
  }
  if (!sparse_inputs.empty()) {  // only with activation sparsity
    static const char* const kNames[] = {"q", "k", "v", "o", "gate", "up", "down"};
    int64_t inputs = 0, zeros = 0;
    for (size_t p = 0; p < sparse_inputs.size(); ++p) {
      inputs += sparse_inputs[p];
      zeros += sparse_zeros[p];
      if (sparse_inputs[p] > 0)
        out[fmt::format("activation_sparsity.{}", kNames[p])] = double(sparse_zeros[p]) / double(sparse_inputs[p]);
    }
    out["sparse_inputs"] = double(inputs);
    out["sparse_inputs_zero"] = double(zeros);
    if (inputs > 0) out["activation_sparsity"] = double(zeros) / double(inputs);
  }
  if (attention_seconds > 0) out["attention_ms"] = attention_seconds * 1e3;  // only when timed
  if (sparse_plan_seconds > 0) out["sparse_plan_ms"] = sparse_plan_seconds * 1e3;
  return out;
}

Result<std::shared_ptr<KvPagePool>> Backend::bit_plane_pool(kernels::BitPlanes planes) {
  for (const auto& p : bit_plane_pools_)
    if (p->bit_planes() == planes) return p;
  if (!kernels::bit_planes_supported(planes))
    return Error{fmt::format("{} backend: bit-plane KV pages of {}+{} bits: {}", name(), planes.msb, planes.lsb,
                             kernels::kBitPlaneWidths)};
  auto made = make_bit_plane_pool(planes);
  if (!made) return made.error();
  bit_plane_pools_.push_back(*made);
  return *made;
}

Result<std::shared_ptr<KvPagePool>> Backend::make_bit_plane_pool(kernels::BitPlanes) {
  return Error{fmt::format("the {} backend has no bit-plane KV pages", name())};
}

Status Engine::check_pool(const KvSequence& seq) const {
  if (&seq.pool() == pool_.get()) return ok_status();
  const bool ours = &seq.pool() == default_pool_.get() ||
                    std::any_of(method_pools_.begin(), method_pools_.end(),
                                [&](const auto& p) { return p.get() == &seq.pool(); });
  if (!ours) return Error{"engine: the sequence was not created by this engine"};
  const auto format = [](const KvPagePool& p) {
    const kernels::BitPlanes b = p.bit_planes();
    return b.active() ? fmt::format("bit planes {}+{}", b.msb, b.lsb) : std::string(kernels::dtype_name(p.dtype()));
  };
  return Error{fmt::format("engine: the sequence's KV pages are {}, the current method's are {}: make sequences "
                           "after set_method",
                           format(seq.pool()), format(*pool_))};
}

Status Engine::check_call(const KvSequence& seq, std::span<const int32_t> tokens, bool cache_positions) const {
  const ModelConfig& c = config();
  const int64_t n = int64_t(tokens.size());
  if (auto s = check_pool(seq); !s) return s;
  if (cache_positions) {
    // Positions are cache indices: only what is stored counts against the context.
    int64_t stored = 0;
    for (int32_t l = 0; l < c.n_layers; ++l)
      for (int32_t g = 0; g < c.n_kv_heads; ++g) stored = std::max<int64_t>(stored, seq.table(l, g).n_tokens());
    if (stored + n > max_context_)
      return Error{fmt::format("context length exceeded: {} stored + {} new tokens > max context {}", stored, n,
                               max_context_)};
  } else if (int64_t(seq.n_past()) + n > max_context_) {
    return Error{fmt::format("context length exceeded: {} cached + {} new tokens > max context {}", seq.n_past(),
                             n, max_context_)};
  }
  for (int64_t i = 0; i < n; ++i)
    if (tokens[size_t(i)] < 0 || tokens[size_t(i)] >= c.n_vocab)
      return Error{fmt::format("token id {} at index {} is outside the vocabulary (0..{})", tokens[size_t(i)], i,
                               c.n_vocab - 1)};
  return ok_status();
}

// With sliding-window layers, the rows past the smallest window run a token at
// a time: each row's window is then its call's key plan (ForwardPass::
// apply_window). The rows before it see every key and run as one call.
Status Engine::forward(KvSequence& seq, std::span<const int32_t> tokens, int64_t logits_from, const LogitsSink& sink,
                       ForwardObserver* observer) {
  int32_t window = 0;
  for (int32_t l = 0; l < config().n_layers; ++l)
    if (config().window(l) > 0) window = window == 0 ? config().window(l) : std::min(window, config().window(l));
  const int64_t n = int64_t(tokens.size()), past = seq.n_past();
  if (window == 0 || n <= 1 || past + n <= window) return forward_call(seq, tokens, logits_from, sink, observer);
  for (int64_t at = 0; at < n;) {
    const int64_t rows = at == 0 && past < window ? window - past : 1;
    LogitsSink part;
    if (sink) part = [&sink, at](int64_t row, std::span<const float> logits) { sink(row + at, logits); };
    if (auto s = forward_call(seq, tokens.subspan(size_t(at), size_t(rows)), std::clamp<int64_t>(logits_from - at, 0, rows),
                              part, observer);
        !s)
      return s;
    at += rows;
  }
  return ok_status();
}

MethodCall Engine::method_call() const {
  MethodCall call;
  call.method = method_;
  call.hooks = hooks_;
  call.cache_positions = method_ != nullptr && method_->kv_positions() == KvPositions::Cache;
  if (call.has(kHookRetention)) call.retention = method_->retention_policy();
  call.bound_per_head = call.has(kHookPageBudget) && method_->bound_scope() == BoundScope::QueryHead;
  if (method_ != nullptr) call.values = method_->value_pruning();
  if (method_ != nullptr) call.quant = method_->kv_quantization();
  if (sparsity_.active()) call.sparsity = &sparsity_;
  if (predicted_.active()) call.predicted = &predicted_;
  if (exit_.active()) call.exit = &exit_;
  call.draft_layers = draft_layers_;
  return call;
}

Status Engine::forward_call(KvSequence& seq, std::span<const int32_t> tokens, int64_t logits_from,
                            const LogitsSink& sink, ForwardObserver* observer) {
  if (tokens.empty()) return ok_status();
  MethodCall call = method_call();
  if (auto s = check_call(seq, tokens, call.cache_positions); !s) return s;
  return guarded([&] {
    call.state = sequence_state(seq);
    ForwardPass pass(*backend_, config(), options_, call, counters_, seq, tokens, observer);
    return pass.run(logits_from, sink);
  });
}

SequenceState* Engine::sequence_state(KvSequence& seq) const {
  if (method_ == nullptr) return nullptr;
  return seq.method_state(method_->engine_instance, [&] { return method_->new_sequence_state(shape()); });
}

Status Engine::guarded(const std::function<Status()>& body) const {
  try {
    return body();
  } catch (const std::bad_alloc&) {
    return Error{fmt::format("{}: out of memory for KV cache pages", backend_->name())};
  } catch (const std::exception& e) {
    return Error{fmt::format("{}: {}", backend_->name(), e.what())};
  }
}

Status Engine::forward_batch(std::span<const BatchItem> items) {
  bool windows = false;
  for (int32_t l = 0; l < config().n_layers; ++l) windows = windows || config().window(l) > 0;
  const MethodCall shared = method_call();
  std::vector<BatchMember> members;
  for (size_t i = 0; i < items.size(); ++i) {
    const BatchItem& item = items[i];
    if (item.seq == nullptr) return Error{fmt::format("forward_batch: item {} has no sequence", i)};
    for (size_t j = 0; j < i; ++j)
      if (items[j].seq == item.seq)
        return Error{fmt::format("forward_batch: items {} and {} are the same sequence", j, i)};
    if (item.tokens.empty()) continue;
    if (auto s = check_pool(*item.seq); !s) return s;
    if (auto s = check_call(*item.seq, item.tokens, shared.cache_positions); !s)
      return Error{fmt::format("forward_batch: item {}: {}", i, s.message())};
    members.push_back({item.seq, item.tokens, item.logits_from, &item.sink, shared});
  }
  if (members.empty()) return ok_status();
  if (windows || members.size() == 1) {  // one call per item (sliding windows split calls by row)
    if (members.size() > 1) ++counters_.batch_fallbacks;
    for (const BatchMember& m : members)
      if (auto s = forward(*m.seq, m.tokens, m.logits_from, *m.sink); !s) return s;
    return ok_status();
  }
  return guarded([&] {
    for (BatchMember& m : members) m.call.state = sequence_state(*m.seq);
    return run_batch(*backend_, config(), options_, counters_, members);
  });
}

Status Engine::truncate(KvSequence& seq, int32_t n) {
  if (auto s = check_pool(seq); !s) return s;
  if (n < 0 || n > seq.n_past())
    return Error{fmt::format("truncate: {} tokens asked, the sequence has {}", n, seq.n_past())};
  return backend_->truncate(seq, n);
}

Status Engine::speculate(KvSequence& seq, int32_t token, int32_t max_drafts, Speculated& out) {
  if (!speculation_.active()) return Error{"speculate: the engine's method does not speculate"};
  if (auto s = check_pool(seq); !s) return s;
  const int32_t start = seq.n_past();
  // The token and its drafts must fit in the context (a full one is refused by the verifying call).
  const int32_t room = std::max(0, max_context_ - start - 1);
  const int32_t count = std::clamp(std::min(speculation_.draft_length, max_drafts), 0, room);
  out.drafts.clear();
  if (count > 0) {
    struct Drafting {  // the engine's calls are draft steps while this lives
      int32_t& layers;
      Drafting(int32_t& l, int32_t n) : layers(l) { layers = n; }
      ~Drafting() { layers = 0; }
    };
    {
      const Drafting drafting(draft_layers_, speculation_.exit_layer);
      int32_t from = token;
      for (int32_t i = 0; i < count; ++i) {
        int32_t next = 0;
        auto s = forward(seq, std::span<const int32_t>(&from, 1), 0, [&](int64_t, std::span<const float> logits) {
          next = int32_t(kernels::cpu::argmax(logits.data(), int64_t(logits.size())));
        });
        if (!s) {  // the drafts made so far leave the cache with the error
          (void)truncate(seq, start);
          return s;
        }
        ++counters_.draft_steps;
        out.drafts.push_back(next);
        from = next;
      }
    }
    if (auto s = truncate(seq, start); !s) return s;
    counters_.drafted_tokens += count;
  }
  std::vector<int32_t> tokens = {token};
  tokens.insert(tokens.end(), out.drafts.begin(), out.drafts.end());
  const size_t vocab = size_t(config().n_vocab);
  out.rows.assign(tokens.size() * vocab, 0.0f);
  auto s = forward(seq, tokens, 0, [&](int64_t row, std::span<const float> logits) {
    std::copy(logits.begin(), logits.end(), out.rows.begin() + ptrdiff_t(size_t(row) * vocab));
  });
  if (!s) return s;
  ++counters_.verify_calls;
  return ok_status();
}

Status Engine::drop_drafts(KvSequence& seq, int32_t count, bool rejected) {
  if (count <= 0) return ok_status();
  if (count > seq.n_past())
    return Error{fmt::format("drop_drafts: {} drafts, the sequence has {} tokens", count, seq.n_past())};
  if (auto s = truncate(seq, seq.n_past() - count); !s) return s;
  (rejected ? counters_.drafts_rejected : counters_.drafts_unused) += count;
  return ok_status();
}

Status check_component_mask(const ComponentMask& mask, const ModelConfig& c, int32_t layer) {
  if (mask.heads.size() != size_t(c.n_heads))
    return Error{fmt::format("method: component mask of layer {} has {} head entries, the model has {} heads",
                             layer, mask.heads.size(), c.n_heads)};
  if (mask.oracle_neurons < 0 || mask.oracle_neurons > c.n_ff || mask.oracle_heads < 0 || mask.oracle_heads > c.n_heads)
    return Error{fmt::format("method: component mask of layer {}: oracle_neurons {} must be within 0..{} and "
                             "oracle_heads {} within 0..{}",
                             layer, mask.oracle_neurons, c.n_ff, mask.oracle_heads, c.n_heads)};
  if (mask.oracle_neurons > 0 && !mask.all_neurons)
    return Error{fmt::format("method: component mask of layer {}: oracle_neurons needs all_neurons (the oracle "
                             "chooses from the dense activation)",
                             layer)};
  if (mask.all_neurons) return ok_status();
  for (size_t i = 0; i < mask.neurons.size(); ++i) {
    const int32_t j = mask.neurons[i];
    if (j < 0 || j >= c.n_ff || (i > 0 && j <= mask.neurons[i - 1]))
      return Error{fmt::format(
          "method: component mask of layer {}: neurons must be ascending within 0..{} (entry {} is {})", layer,
          c.n_ff - 1, i, j)};
  }
  return ok_status();
}

Status normalize_prefill_pattern(PrefillPattern& pattern, int32_t layer, int32_t head, bool kv_head_selected) {
  const auto where = fmt::format("method: prefill pattern of (layer {}, head {})", layer, head);
  if (pattern.block_size <= 0) return Error{fmt::format("{}: block_size {} must be positive", where, pattern.block_size)};
  if (kv_head_selected) return Error{fmt::format("{}: a decode selection was also given for its kv head", where)};
  using Kind = PrefillPattern::Kind;
  switch (pattern.kind) {
    case Kind::Blocks:
      for (const auto& [qb, kb] : pattern.blocks)
        if (kb < 0 || kb > qb)
          return Error{fmt::format("{}: block pair ({}, {}) must have 0 <= key block <= query block", where, qb, kb)};
      std::sort(pattern.blocks.begin(), pattern.blocks.end());
      pattern.blocks.erase(std::unique(pattern.blocks.begin(), pattern.blocks.end()), pattern.blocks.end());
      return ok_status();
    case Kind::VerticalSlash:
      for (const auto& [name, value] : {std::pair{"verticals", pattern.verticals}, {"slashes", pattern.slashes},
                                        {"keep_first_columns", pattern.keep_first_columns},
                                        {"keep_last_diagonals", pattern.keep_last_diagonals}})
        if (value < 0) return Error{fmt::format("{}: {} {} must be >= 0", where, name, value)};
      if (pattern.last_q <= 0) return Error{fmt::format("{}: last_q {} must be positive", where, pattern.last_q)};
      return ok_status();
    case Kind::BlockTopK:
      if (pattern.top_k < 0) return Error{fmt::format("{}: top_k {} must be >= 0", where, pattern.top_k)};
      return ok_status();
    case Kind::AShape:
      if (pattern.sink < 0 || pattern.local < 0)
        return Error{fmt::format("{}: sink {} and local {} must be >= 0", where, pattern.sink, pattern.local)};
      return ok_status();
  }
  return Error{fmt::format("{}: unknown kind {}", where, int32_t(pattern.kind))};
}

Status check_kv_selection(const KvSelection& sel, int32_t cached, int32_t page_size, int32_t layer, int32_t kv_head,
                          int32_t group_size) {
  const bool pages = sel.unit == KvSelection::Unit::Pages;
  const int32_t limit = pages ? (cached + page_size - 1) / page_size : cached;
  for (size_t i = 0; i < sel.indices.size(); ++i) {
    const int32_t x = sel.indices[i];
    if (x < 0 || x >= limit || (i > 0 && x <= sel.indices[i - 1]))
      return Error{fmt::format("method: decode selection for (layer {}, kv head {}) must list ascending {} in "
                               "0..{}; entry {} is {}",
                               layer, kv_head, pages ? "pages" : "tokens", limit - 1, i, x)};
  }
  if (sel.heads.empty()) return ok_status();
  if (group_size > kMaxSelectionGroup)
    return Error{fmt::format("method: decode selection for (layer {}, kv head {}) lists query heads, which takes "
                             "groups of at most {} query heads; this model has {}",
                             layer, kv_head, kMaxSelectionGroup, group_size)};
  if (sel.heads.size() != sel.indices.size())
    return Error{fmt::format("method: decode selection for (layer {}, kv head {}) has {} head masks for {} indices",
                             layer, kv_head, sel.heads.size(), sel.indices.size())};
  const uint32_t group = group_mask(group_size);
  for (size_t i = 0; i < sel.heads.size(); ++i)
    if (sel.heads[i] == 0 || (sel.heads[i] & ~group) != 0)
      return Error{fmt::format("method: decode selection for (layer {}, kv head {}): head mask {:#x} of entry {} "
                               "must name some of the group's {} query heads",
                               layer, kv_head, sel.heads[i], i, group_size)};
  return ok_status();
}

PageBoundSync stale_bound_pages(const KvSequence& seq, int32_t layer, int32_t kv_head, int32_t n,
                                const PageBoundSync& sync, std::vector<int32_t>& pages, std::vector<int32_t>& counts) {
  const HeadPageTable& t = seq.table(layer, kv_head);
  const int32_t ps = seq.pool().shape().page_size;
  const bool current = sync.seq_id == seq.id() && sync.rewrites == t.rewrites && sync.tokens <= n;
  const int32_t from = current ? sync.tokens : 0;
  if (from < n)
    for (int32_t p = from / ps; p * ps < n; ++p) {
      pages.push_back(t.pages[size_t(p)]);
      counts.push_back(std::min(ps, n - p * ps));
    }
  return PageBoundSync{seq.id(), t.rewrites, n};
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
