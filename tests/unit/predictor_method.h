// Component predictors for tests (ComponentPredictors): a method that hands
// predictors (inferlab/testing/predictors.h makes random ones) to the engine,
// and the reference that chooses with the same arithmetic on the host through
// mask_components (same input, top-k, union over rows and lookahead).
#pragma once

#include <algorithm>
#include <span>
#include <vector>

#include "cpu/predictors.h"
#include "inferlab/plugin.h"
#include "inferlab/testing/predictors.h"

namespace inferlab::test {

class PredictedMethod final : public Method {
 public:
  explicit PredictedMethod(ComponentPredictors p) : p_(std::move(p)) {}
  ComponentPredictors component_predictors() const override { return p_; }

 private:
  ComponentPredictors p_;
};

// The same choices made on the host from the hidden state mask_components sees.
class HostPredictedMethod final : public Method {
 public:
  explicit HostPredictedMethod(ComponentPredictors p) : p_(std::move(p)) {}
  bool mask_components(const StepInfo& step, int32_t layer, std::span<const float> hidden,
                       ComponentMask& mask) override {
    namespace cpu = kernels::cpu;
    const int64_t d = int64_t(hidden.size()) / rows_of(hidden), rows = rows_of(hidden);
    std::vector<float> x(hidden.size());
    cpu::rms_scale_rows(x.data(), hidden.data(), rows, d, p_.norm_eps);
    bool any = false;
    if (!p_.neurons.empty() && p_.neurons[size_t(layer)].present()) {
      const auto flags = choose(p_.neurons[size_t(layer)], x, rows, d, n_ff_);
      mask.all_neurons = false;
      mask.neurons.clear();
      for (size_t j = 0; j < flags.size(); ++j)
        if (flags[j] != 0) mask.neurons.push_back(int32_t(j));
      any = true;
    }
    if (!p_.heads.empty() && p_.heads[size_t(layer)].present()) {
      const bool behind = layer > 0 && seen_step_ == step.step && seen_layer_ == layer - 1 && seen_.size() == x.size();
      mask.heads = choose(p_.heads[size_t(layer)], behind ? seen_ : x, rows, d, int64_t(mask.heads.size()));
      any = true;
    }
    seen_ = x;
    seen_step_ = step.step;
    seen_layer_ = layer;
    return any;
  }
  Status on_load(const LoadContext& ctx) override {
    n_ff_ = ctx.shape.n_ff;
    n_embd_ = ctx.shape.n_embd;
    return ok_status();
  }
  void set_shape(int64_t n_ff, int64_t n_embd) {
    n_ff_ = n_ff;
    n_embd_ = n_embd;
  }

 private:
  int64_t rows_of(std::span<const float> hidden) const { return int64_t(hidden.size()) / n_embd_; }
  static std::vector<uint8_t> choose(const LowRankPredictor& p, const std::vector<float>& x, int64_t rows, int64_t d,
                                     int64_t out) {
    namespace cpu = kernels::cpu;
    std::vector<float> h(size_t(rows * std::max(p.rank, 1))), logits(size_t(rows * out));
    const float* in = x.data();
    if (p.rank > 0) {
      cpu::predictor_layer(h.data(), x.data(), p.w1.data(), nullptr, rows, d, p.rank, p.relu);
      in = h.data();
    }
    cpu::predictor_layer(logits.data(), in, p.w2.data(), p.b2.empty() ? nullptr : p.b2.data(), rows,
                         p.rank > 0 ? p.rank : d, out, false);
    std::vector<uint8_t> flags(size_t(out), 0);
    cpu::top_k_flags(flags.data(), logits.data(), rows, out, p.keep);
    return flags;
  }

  ComponentPredictors p_;
  int64_t n_ff_ = 0, n_embd_ = 1;
  std::vector<float> seen_;
  int64_t seen_step_ = -1;
  int32_t seen_layer_ = -1;
};

}  // namespace inferlab::test
