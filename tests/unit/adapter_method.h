// A method that puts low-rank adapters on projections at load (random A and B,
// or B = 0), merged or not, optionally with an FFN neuron subset: the engine's
// per-run adapter mechanism, driven the way the LoRA plugins drive it.
#pragma once

#include <random>
#include <string>
#include <tuple>
#include <vector>

#include "engine/engine.h"
#include "inferlab/plugin.h"
#include "inferlab/testing/support.h"
#include "plugins/method_context.h"

namespace inferlab::test {

struct AdapterSpec {
  std::string tensor;
  int32_t layer = 0;
  LowRankAdapter adapter;
};

// An adapter of `rank` for a projection of (out, in), entries uniform in
// [-amplitude, amplitude) from `seed` (B = 0 when zero_b).
inline LowRankAdapter random_adapter(int64_t out, int64_t in, int32_t rank, uint64_t seed, float scale,
                                     bool zero_b = false, float amplitude = 0.05f) {
  std::mt19937_64 rng(seed);
  std::uniform_real_distribution<float> u(-amplitude, amplitude);
  LowRankAdapter a;
  a.rank = rank;
  a.scale = scale;
  a.a.resize(size_t(rank * in));
  a.b.resize(size_t(out * rank));
  for (float& x : a.a) x = u(rng);
  for (float& x : a.b) x = zero_b ? 0.0f : u(rng);
  return a;
}

// Rank-4 adapters (scale 2) on every kind of projection, over two layers.
inline std::vector<AdapterSpec> adapters_on_every_projection(const ModelConfig& c, bool zero_b = false) {
  std::vector<AdapterSpec> specs;
  uint64_t seed = 100;
  using Shape = std::tuple<const char*, int32_t, int64_t, int64_t>;
  const int64_t e = c.n_embd, f = c.n_ff;
  const int32_t last = c.n_layers - 1;
  for (const auto& [tensor, layer, out, in] :
       {Shape{"attn_q", 0, c.q_dim(), e}, Shape{"attn_k", last, c.kv_dim(), e}, Shape{"attn_v", 0, c.kv_dim(), e},
        Shape{"attn_output", last, e, c.q_dim()}, Shape{"ffn_gate", 0, f, e}, Shape{"ffn_up", last, f, e},
        Shape{"ffn_down", 0, e, f}})
    specs.push_back(AdapterSpec{tensor, layer, random_adapter(out, in, 4, seed++, 2.0f, zero_b)});
  return specs;
}

class AdapterMethod final : public Method {
 public:
  explicit AdapterMethod(std::vector<AdapterSpec> specs, bool merge = false, int32_t neuron_stride = 1)
      : specs_(std::move(specs)), merge_(merge), neuron_stride_(neuron_stride) {}

  Status on_load(const LoadContext& ctx) override {
    shape_ = ctx.shape;
    for (AdapterSpec spec : specs_) {
      spec.adapter.merge = merge_;
      if (auto s = ctx.overrides->add_adapter(spec.tensor, spec.layer, spec.adapter); !s) return s;
    }
    return ok_status();
  }

  bool mask_components(const StepInfo&, int32_t, std::span<const float>, ComponentMask& mask) override {
    if (neuron_stride_ <= 1) return false;
    mask.all_neurons = false;
    for (int32_t j = 0; j < shape_.n_ff; j += neuron_stride_) mask.neurons.push_back(j);
    return true;
  }

  uint32_t hooks() const { return kHookLoad | (neuron_stride_ > 1 ? kHookComponentMask : 0u); }

 private:
  std::vector<AdapterSpec> specs_;
  bool merge_;
  int32_t neuron_stride_;
  ModelShape shape_;
};

// Loads `method` (null: dense; the weights it changes go into the run's
// overrides) with `hooks`, then prefills all but the last `decode` tokens and
// decodes those one by one; every row's logits.
inline Result<std::vector<float>> run_with_method(Engine& engine, Method* method, uint32_t hooks,
                                                  const std::vector<int32_t>& tokens, int64_t decode) {
  static const PluginEntry entry{"adapters", "1", "", kHookLoad, {}, ""};
  WeightOverrides overrides;
  if (method != nullptr)
    if (auto s = load_method(*method, entry, engine, temp_path("artifacts"), &overrides); !s) return s.error();
  if (auto s = engine.set_method(method, method != nullptr ? hooks : 0, &overrides, "adapters"); !s)
    return s.error();
  std::vector<float> logits;
  auto seq = engine.new_sequence();
  const int64_t prompt = int64_t(tokens.size()) - decode;
  auto sink = [&](int64_t, std::span<const float> row) { logits.insert(logits.end(), row.begin(), row.end()); };
  Status s = engine.forward(*seq, std::span(tokens).first(size_t(prompt)), 0, sink);
  for (int64_t i = prompt; s && i < int64_t(tokens.size()); ++i)
    s = engine.forward(*seq, std::span(&tokens[size_t(i)], 1), 0, sink);
  (void)engine.set_method(nullptr, 0);
  if (!s) return s.error();
  return logits;
}

inline Result<std::vector<float>> run_with_adapters(Engine& engine, AdapterMethod* method,
                                                    const std::vector<int32_t>& tokens, int64_t decode) {
  return run_with_method(engine, method, method != nullptr ? method->hooks() : 0, tokens, decode);
}

}  // namespace inferlab::test
