// Engine-side retention (kHookRetention): the choice every backend makes, as a
// host reference. The CPU backend calls it; the CUDA backend's kernels make
// the same choice on the device and are tested against it.
#pragma once

#include <cstdint>
#include <span>
#include <vector>

#include "inferlab/plugin.h"

namespace inferlab {

// The stored tokens of one head that leave (ascending): all but its first
// `sink`, its last `recent` and its `heavy` best-scoring others (score
// descending, ties to the earlier token; a NaN score ranks last). Nothing when
// heavy < 0 or the head holds no more than sink + recent + heavy tokens.
void retention_drops(std::span<const float> score, const RetentionBudget& budget, std::vector<int32_t>& drop);

}  // namespace inferlab
