// A method whose prefill patterns have different block sizes on different
// heads (8 on even heads, 4 on odd ones: a sink block, the previous block and
// the diagonal), or the same patterns all written at block size 4 (`refined`):
// the engine refines mixed sizes to one exactly, so both give the same logits.
#pragma once

#include <cstdint>

#include "inferlab/plugin.h"

namespace inferlab::test {

class MixedBlocks final : public Method {
 public:
  // Patterns cover positions 0 .. span - 1.
  explicit MixedBlocks(bool refined, int32_t span = 64) : refined_(refined), span_(span) {}
  bool prefill_pattern(const StepInfo&, int32_t, int32_t head, PrefillPattern& p) override {
    const int32_t bs = head % 2 == 0 && !refined_ ? 8 : 4, f = 8 / 4;
    p.block_size = bs;
    for (int32_t qb = 0; qb * bs < span_; ++qb) {
      p.blocks.emplace_back(qb, 0);
      if (qb > 0) p.blocks.emplace_back(qb, qb - 1);
      p.blocks.emplace_back(qb, qb);
    }
    if (head % 2 == 0 && refined_) {  // the 8-pattern written at 4
      p.blocks.clear();
      for (int32_t qb = 0; qb * 8 < span_; ++qb)
        for (int32_t kb : {0, qb - 1, qb})
          if (kb >= 0)
            for (int32_t qs = qb * f; qs < qb * f + f; ++qs)
              for (int32_t ks = kb * f; ks < kb * f + f && ks <= qs; ++ks) p.blocks.emplace_back(qs, ks);
    }
    return true;
  }

 private:
  bool refined_;
  int32_t span_;
};

}  // namespace inferlab::test
