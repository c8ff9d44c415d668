// Predicted components on the CPU backend (ComponentPredictors): the
// predictors score the layer input's rows, each row's top keep is marked, and
// the union becomes the lists that linear's gathered rows and linear_heads read.
#include <algorithm>

#include "cpu/predictors.h"
#include "engine/cpu_backend.h"

namespace inferlab {

namespace cpu = kernels::cpu;

Status CpuBackend::set_predictors(ComponentPredictors predictors) {
  predictors_ = predictors.active() ? std::move(predictors) : ComponentPredictors{};
  const auto L = size_t(config_.n_layers);
  predicted_neurons_.assign(L, {});
  predicted_heads_.assign(L, {});
  predicted_masks_.assign(L, ComponentMask{});
  return ok_status();
}

void CpuBackend::run_predictor(const LowRankPredictor& p, int64_t out, std::vector<uint8_t>& flags) {
  const int64_t d = config_.n_embd;
  const float* x = pred_x_.data();
  if (p.rank > 0) {
    pred_hidden_.resize(size_t(n_ * p.rank));
    cpu::predictor_layer(pred_hidden_.data(), x, p.w1.data(), nullptr, n_, d, p.rank, p.relu);
    x = pred_hidden_.data();
  }
  pred_logits_.resize(size_t(n_ * out));
  cpu::predictor_layer(pred_logits_.data(), x, p.w2.data(), p.b2.empty() ? nullptr : p.b2.data(), n_,
                       p.rank > 0 ? p.rank : d, out, false);
  flags.assign(size_t(out), 0);
  cpu::top_k_flags(flags.data(), pred_logits_.data(), n_, out, p.keep);
}

Status CpuBackend::predict(int32_t l, bool own_heads) {
  if (!predictors_.active()) return Error{"cpu backend: predict without component predictors"};
  const int64_t d = config_.n_embd;
  pred_x_.resize(size_t(n_ * d));
  cpu::rms_scale_rows(pred_x_.data(), x_.data(), n_, d, predictors_.norm_eps);
  std::vector<uint8_t> flags;
  auto to_list = [&](std::vector<int32_t>& list) {
    list.resize(flags.size());
    list.resize(size_t(cpu::flags_to_list(list.data(), flags.data(), int64_t(flags.size()))));
  };
  auto heads_of = [&](int32_t layer) {
    run_predictor(predictors_.heads[size_t(layer)], config_.n_heads, flags);
    to_list(predicted_heads_[size_t(layer)]);
    predicted_masks_[size_t(layer)].heads = flags;
  };
  if (!predictors_.neurons.empty() && predictors_.neurons[size_t(l)].present()) {
    run_predictor(predictors_.neurons[size_t(l)], config_.n_ff, flags);
    to_list(predicted_neurons_[size_t(l)]);
  }
  if (own_heads && !predictors_.heads.empty() && predictors_.heads[size_t(l)].present()) heads_of(l);
  if (l + 1 < config_.n_layers && !predictors_.heads.empty() && predictors_.heads[size_t(l + 1)].present())
    heads_of(l + 1);
  return ok_status();
}

Status CpuBackend::predicted_counts(int32_t l, int32_t& neurons, int32_t& heads) {
  if (l < 0 || size_t(l) >= predicted_neurons_.size()) return Error{"cpu backend: no predicted components"};
  neurons = int32_t(predicted_neurons_[size_t(l)].size());
  heads = int32_t(predicted_heads_[size_t(l)].size());
  return ok_status();
}

Status CpuBackend::linear_predicted(Proj p, int32_t l) {
  if (l < 0 || size_t(l) >= predicted_neurons_.size()) return Error{"cpu backend: no predicted components"};
  if (p == Proj::Q || p == Proj::O) return linear_heads(p, l, predicted_heads_[size_t(l)]);
  if (p == Proj::Gate || p == Proj::Up || p == Proj::Down) return linear(p, l, &predicted_neurons_[size_t(l)]);
  return Error{fmt::format("cpu backend: {} has no predicted components", proj_name(p))};
}

Status CpuBackend::read_predicted_heads(std::vector<uint8_t>& flags) {
  const auto H = size_t(config_.n_heads);
  flags.assign(predicted_masks_.size() * H, 1);
  for (size_t l = 0; l < predicted_masks_.size(); ++l)
    if (predicted_masks_[l].heads.size() == H) std::copy_n(predicted_masks_[l].heads.begin(), H, flags.begin() + l * H);
  return ok_status();
}

}  // namespace inferlab
