#include "engine/engine.h"

#include <fmt/format.h>

#include <algorithm>

#include "engine/cpu_engine.h"
#include "engine/device.h"
#ifdef INFERLAB_HAVE_CUDA
#include "engine/cuda/cuda_engine.h"
#endif

namespace inferlab {

const char* backend_name(Backend backend) { return backend == Backend::Cuda ? "cuda" : "cpu"; }

Result<Backend> parse_backend(const std::string& name) {
  if (name == "cpu") return Backend::Cpu;
  if (name == "cuda") {
    if (!cuda_compiled())
      return Error{"backend \"cuda\": this build has no CUDA backend (rebuild with -DINFERLAB_CUDA=ON); use \"cpu\""};
    if (cuda_device_count() == 0) return Error{"backend \"cuda\": no CUDA GPU is visible on this machine; use \"cpu\""};
    return Backend::Cuda;
  }
  if (name == "auto") return cuda_compiled() && cuda_device_count() > 0 ? Backend::Cuda : Backend::Cpu;
  return Error{fmt::format("backend \"{}\" is not one of cpu, cuda, auto", name)};
}

Result<GpuDType> parse_gpu_dtype(const std::string& name) {
  if (name == "f16" || name == "fp16" || name == "float16") return GpuDType::F16;
  if (name == "bf16" || name == "bfloat16") return GpuDType::BF16;
  return Error{fmt::format("dtype \"{}\" is not one of f16, bf16", name)};
}

Result<std::unique_ptr<Engine>> Engine::create(std::shared_ptr<const Model> model, EngineOptions options) {
  if (!model) return Error{"engine: no model"};
  if (options.page_size <= 0 || options.page_size > 65536)
    return Error{fmt::format("engine: page_size {} is out of range (1..65536)", options.page_size)};
  if (options.max_context < 0) return Error{fmt::format("engine: max_context {} is negative", options.max_context)};
  if (options.n_threads < 0) return Error{fmt::format("engine: n_threads {} is negative", options.n_threads)};
  if (options.backend == Backend::Cpu) return std::unique_ptr<Engine>(new CpuEngine(std::move(model), options));
#ifdef INFERLAB_HAVE_CUDA
  auto engine = CudaEngine::create(std::move(model), options);
  if (!engine) return engine.error();
  return std::unique_ptr<Engine>(std::move(*engine));
#else
  return Error{"engine: this build has no CUDA backend (rebuild with -DINFERLAB_CUDA=ON)"};
#endif
}

Engine::Engine(std::shared_ptr<const Model> model, EngineOptions options)
    : model_(std::move(model)), options_(options) {
  max_context_ = options_.max_context > 0 ? options_.max_context : model_->config().context_length;
}

void Engine::set_method(Method* method, uint32_t hooks) {
  method_ = method;
  hooks_ = method != nullptr ? hooks : 0;
}

ModelShape Engine::shape() const {
  const ModelConfig& c = config();
  return ModelShape{c.n_layers, c.n_heads, c.n_kv_heads, c.head_dim,   c.n_embd,
                    c.n_ff,     c.n_vocab, max_context_, options_.page_size};
}

std::map<std::string, double> EngineCounters::as_map() const {
  std::map<std::string, double> out = {{"forward_calls", double(forward_calls)},
          {"decode_steps", double(decode_steps)},
          {"tokens_evicted", double(tokens_evicted)},
          {"decode_keys_read", double(decode_keys_read)},
          {"decode_keys_cached", double(decode_keys_cached)},
          {"decode_pages_read", double(decode_pages_read)},
          {"layers_skipped", double(layers_skipped)},
          {"heads_skipped", double(heads_skipped)},
          {"neurons_skipped", double(neurons_skipped)},
          {"sparse_prefill_heads", double(sparse_prefill_heads)}};
  if (attention_seconds > 0) out["attention_ms"] = attention_seconds * 1e3;  // only when timed
  return out;
}

Status Engine::check_call(const KvSequence& seq, std::span<const int32_t> tokens) {
  const ModelConfig& c = config();
  const int64_t n = int64_t(tokens.size());
  if (&seq.pool() != pool_.get()) return Error{"engine: the sequence was not created by this engine"};
  cache_positions_ = method_ != nullptr && method_->kv_positions() == KvPositions::Cache;
  if (cache_positions_) {
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

Status check_component_mask(const ComponentMask& mask, const ModelConfig& c, int32_t layer) {
  if (mask.heads.size() != size_t(c.n_heads))
    return Error{fmt::format("method: component mask of layer {} has {} head entries, the model has {} heads",
                             layer, mask.heads.size(), c.n_heads)};
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

Status normalize_block_pattern(BlockPattern& pattern, int32_t layer, int32_t head, bool kv_head_selected) {
  const auto where = fmt::format("method: prefill pattern of (layer {}, head {})", layer, head);
  if (pattern.block_size <= 0) return Error{fmt::format("{}: block_size {} must be positive", where, pattern.block_size)};
  if (kv_head_selected) return Error{fmt::format("{}: a decode selection was also given for its kv head", where)};
  for (const auto& [qb, kb] : pattern.blocks)
    if (kb < 0 || kb > qb)
      return Error{fmt::format("{}: block pair ({}, {}) must have 0 <= key block <= query block", where, qb, kb)};
  std::sort(pattern.blocks.begin(), pattern.blocks.end());
  pattern.blocks.erase(std::unique(pattern.blocks.begin(), pattern.blocks.end()), pattern.blocks.end());
  return ok_status();
}

Status check_kv_selection(const KvSelection& sel, int32_t cached, int32_t page_size, int32_t layer, int32_t kv_head) {
  const bool pages = sel.unit == KvSelection::Unit::Pages;
  const int32_t limit = pages ? (cached + page_size - 1) / page_size : cached;
  for (size_t i = 0; i < sel.indices.size(); ++i) {
    const int32_t x = sel.indices[i];
    if (x < 0 || x >= limit || (i > 0 && x <= sel.indices[i - 1]))
      return Error{fmt::format("method: decode selection for (layer {}, kv head {}) must list ascending {} in "
                               "0..{}; entry {} is {}",
                               layer, kv_head, pages ? "pages" : "tokens", limit - 1, i, x)};
  }
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

std::vector<int32_t> Engine::page_budgets(const StepInfo& step, const KvView& view, const KvSequence& seq,
                                          int32_t layer) {
  std::vector<int32_t> budgets(static_cast<size_t>(config().n_kv_heads), -1);
  if ((hooks_ & kHookPageBudget) == 0) return budgets;
  const int32_t ps = seq.pool().shape().page_size;
  for (int32_t g = 0; g < config().n_kv_heads; ++g) {
    const int32_t budget = method_->page_budget(step, view, layer, g);
    const int32_t pages = (seq.table(layer, g).n_tokens() + ps - 1) / ps;
    budgets[size_t(g)] = budget < 0 ? -1 : budget > 0 && budget < pages ? budget : 0;
  }
  return budgets;
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
