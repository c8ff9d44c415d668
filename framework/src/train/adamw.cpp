// AdamW with torch.optim.AdamW's update (the formula is in inferlab/train.h).
#include <algorithm>
#include <cmath>
#include <string>

#include "inferlab/train.h"

namespace inferlab::train {

Result<AdamW> AdamW::create(const AdamWOptions& o) {
  auto fail = [](const std::string& what) -> Error { return Error{"AdamW: " + what}; };
  if (!(o.lr >= 0)) return fail("lr must be >= 0, got " + std::to_string(o.lr));
  if (!(o.beta1 >= 0 && o.beta1 < 1)) return fail("beta1 must be in [0, 1), got " + std::to_string(o.beta1));
  if (!(o.beta2 >= 0 && o.beta2 < 1)) return fail("beta2 must be in [0, 1), got " + std::to_string(o.beta2));
  if (!(o.eps >= 0)) return fail("eps must be >= 0, got " + std::to_string(o.eps));
  if (!(o.weight_decay >= 0)) return fail("weight_decay must be >= 0, got " + std::to_string(o.weight_decay));
  return AdamW(o);
}

Status AdamW::step(std::span<const Parameter> params) {
  if (steps_ == 0) {
    m_.clear();
    v_.clear();
    for (const Parameter& p : params) {
      m_.emplace_back(p.value.size(), 0.0f);
      v_.emplace_back(p.value.size(), 0.0f);
    }
  }
  if (params.size() != m_.size())
    return Error{"AdamW: step got " + std::to_string(params.size()) + " tensors, the state has " +
                 std::to_string(m_.size())};
  for (size_t t = 0; t < params.size(); ++t)
    if (params[t].value.size() != m_[t].size() || params[t].grad.size() != m_[t].size())
      return Error{"AdamW: tensor " + std::to_string(t) + " has " + std::to_string(params[t].value.size()) +
                   " values and " + std::to_string(params[t].grad.size()) + " gradients, the state has " +
                   std::to_string(m_[t].size())};
  ++steps_;
  const AdamWOptions& o = options_;
  const double t = static_cast<double>(steps_);
  const float decay = static_cast<float>(1.0 - o.lr * o.weight_decay);
  const float step_size = static_cast<float>(o.lr / (1.0 - std::pow(o.beta1, t)));
  const float bc2_sqrt = static_cast<float>(std::sqrt(1.0 - std::pow(o.beta2, t)));
  // 1 - beta in double, then rounded, as torch does with Python-float scalars
  // (0.999f's complement in float would be 1.3e-5 off).
  const float b1 = static_cast<float>(o.beta1), b2 = static_cast<float>(o.beta2), eps = static_cast<float>(o.eps);
  const float c1 = static_cast<float>(1.0 - o.beta1), c2 = static_cast<float>(1.0 - o.beta2);
  for (size_t i = 0; i < params.size(); ++i) {
    float* p = params[i].value.data();
    const float* g = params[i].grad.data();
    float* m = m_[i].data();
    float* v = v_[i].data();
    for (size_t e = 0; e < m_[i].size(); ++e) {
      p[e] *= decay;
      m[e] = b1 * m[e] + c1 * g[e];
      v[e] = b2 * v[e] + c2 * g[e] * g[e];
      p[e] -= step_size * m[e] / (std::sqrt(v[e]) / bc2_sqrt + eps);
    }
  }
  return ok_status();
}

Status AdamW::restore(int64_t steps, std::vector<std::vector<float>> m, std::vector<std::vector<float>> v) {
  if (steps < 0) return Error{"AdamW: restore got " + std::to_string(steps) + " steps"};
  if (m.size() != v.size()) return Error{"AdamW: restore got moments of different tensor counts"};
  for (size_t t = 0; t < m.size(); ++t)
    if (m[t].size() != v[t].size())
      return Error{"AdamW: restore got moments of different sizes for tensor " + std::to_string(t)};
  steps_ = steps;
  m_ = std::move(m);
  v_ = std::move(v);
  return ok_status();
}

double scheduled_lr(double base_lr, const Schedule& s, int64_t step) {
  if (step < s.warmup) return base_lr * double(step) / double(std::max<int64_t>(1, s.warmup));
  if (s.kind == ScheduleKind::kConstant) return base_lr;
  const double progress =
      double(step - s.warmup) / double(std::max<int64_t>(1, s.total - s.warmup));
  if (s.kind == ScheduleKind::kLinear) return base_lr * std::max(0.0, 1.0 - progress);
  return base_lr * std::max(0.0, 0.5 * (1.0 + std::cos(M_PI * progress)));
}

double clip_grad_norm(std::span<const std::span<float>> grads, double max_norm) {
  double sum = 0;
  for (const auto& g : grads)
    for (float x : g) sum += double(x) * double(x);
  const double norm = std::sqrt(sum);
  if (max_norm > 0 && norm > max_norm) {
    const float coef = float(max_norm / (norm + 1e-6));
    for (const auto& g : grads)
      for (float& x : g) x *= coef;
  }
  return norm;
}

}  // namespace inferlab::train
