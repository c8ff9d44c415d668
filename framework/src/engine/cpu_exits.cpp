// Early exit by confidence on the CPU backend (ExitPolicy): the measures of
// the call's last row after a checked layer, and the exit head that maps it
// before the logits.
#include <algorithm>

#include "cpu/early_exit.h"
#include "cpu/predictors.h"
#include "cpu/cpu_ops.h"
#include "engine/cpu_backend.h"

namespace inferlab {

namespace cpu = kernels::cpu;

Status CpuBackend::set_exit_policy(ExitPolicy policy) {
  exits_ = policy.active() ? std::move(policy) : ExitPolicy{};
  return ok_status();
}

// y (out) = m.weight · (h / RMS(h)) + m.bias: what an exit head or a
// classifier reads (y may be h).
void CpuBackend::exit_map(const ExitMap& m, int64_t out, const float* h, float* y) {
  const int64_t d = config_.n_embd;
  exit_x_.resize(size_t(d));
  cpu::rms_scale_rows(exit_x_.data(), h, 1, d, exits_.norm_eps);
  cpu::predictor_layer(y, exit_x_.data(), m.weight.data(), m.bias.empty() ? nullptr : m.bias.data(), 1, d, out, false);
}

Status CpuBackend::keep_exit_state() {
  const int64_t d = config_.n_embd;
  const float* h = last_row();
  exit_state().assign(h, h + d);
  return ok_status();
}

Result<float> CpuBackend::exit_confidence(int32_t l) {
  const ModelConfig& c = config_;
  const int64_t d = c.n_embd;
  if (!exits_.active() || l < 0 || l >= c.n_layers) return Error{"cpu backend: exit confidence without an exit policy"};
  const float* h = last_row();
  exit_x_.resize(size_t(d));
  switch (exits_.measure) {
    case ExitMeasure::State:
      if (int64_t(exit_state().size()) != d) return Error{"cpu backend: the state measure without the layer's input"};
      return cpu::cosine_similarity(exit_state().data(), h, d);
    case ExitMeasure::Classifier: {
      float z[2];
      exit_map(exits_.classifiers[size_t(l)], 2, h, z);
      return cpu::two_way_confidence(z);
    }
    case ExitMeasure::Softmax: {
      const float* row = h;
      if (!exits_.heads.empty() && exits_.heads[size_t(l)].present()) {
        exit_y_.resize(size_t(d));
        exit_map(exits_.heads[size_t(l)], d, h, exit_y_.data());
        row = exit_y_.data();
      }
      cpu::rmsnorm(exit_x_.data(), row, model_->weights().output_norm.data(), 1, d, c.rms_eps);
      logits_.resize(std::max(logits_.size(), size_t(c.n_vocab)));
      output_head(exit_x_.data(), 1, logits_.data());
      return cpu::softmax_margin(logits_.data(), c.n_vocab);
    }
  }
  return Error{"cpu backend: unknown exit measure"};
}

Status CpuBackend::apply_exit_head(int32_t l) {
  const int64_t d = config_.n_embd;
  if (exits_.heads.empty() || l < 0 || !exits_.heads[size_t(l)].present()) return ok_status();
  float* h = last_row();
  exit_map(exits_.heads[size_t(l)], d, h, h);
  return ok_status();
}

}  // namespace inferlab
