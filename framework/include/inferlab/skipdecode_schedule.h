// SkipDecode's position-wise layer budget (Del Corro et al., 2023), shared by
// the skipdecode plugin (its decode steps) and by fine-tuning with the
// schedule in the forward (`inferlab finetune`, [finetune] skip_* keys). A
// token at generated index g (0: the first token after the prompt) runs
//   budget(g) = max_exit - floor((max_exit - min_exit) * min(g, S - 1) / (S - 1))
// layers (S = schedule_length; S = 1: min_exit from the first token): the
// bottom warmup_layers, then the TOP budget - warmup_layers, skipping the
// middle. Budgets never grow, so every layer a later token runs was run by
// every earlier token.
#pragma once

#include <algorithm>
#include <cstdint>

namespace inferlab {

struct SkipDecodeSchedule {
  int32_t n_layers = 0;
  int32_t max_exit = 0, min_exit = 0;  // layers run; resolved (not 0)
  int32_t warmup_layers = 1;
  int32_t schedule_length = 256;

  int32_t budget(int64_t g) const {
    if (schedule_length <= 1) return min_exit;
    const int64_t t = std::min<int64_t>(std::max<int64_t>(g, 0), schedule_length - 1);
    return max_exit - int32_t(int64_t(max_exit - min_exit) * t / (schedule_length - 1));
  }
  // Whether a token with this budget runs `layer`.
  bool runs(int32_t layer, int32_t budget) const {
    return budget >= n_layers || layer < warmup_layers || layer >= n_layers - (budget - warmup_layers);
  }
};

}  // namespace inferlab
