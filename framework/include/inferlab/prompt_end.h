// A sequence's generated index, for methods whose decisions depend on how many
// tokens they have generated (SkipDecode's budget, CALM's decaying threshold):
// return a PromptEnd from Method::new_sequence_state and call
// PromptEnd::generated(step) from a hook that sees every call.
#pragma once

#include <memory>
#include <optional>

#include "inferlab/plugin.h"

namespace inferlab {

struct PromptEnd final : SequenceState {
  int32_t end = 0;  // where the latest call that was not a decode step ended
  std::unique_ptr<SequenceState> clone() const override { return std::make_unique<PromptEnd>(*this); }

  // A decode step: first_position minus the end of the latest prompt (0: the
  // first token generated after it). Any other call (a prompt) records its end
  // in the step's state and gives nullopt.
  static std::optional<int64_t> generated(const StepInfo& step) {
    auto* state = static_cast<PromptEnd*>(step.state);
    if (!step.decode()) {
      if (state != nullptr) state->end = step.first_position + step.n_tokens;
      return std::nullopt;
    }
    return int64_t(step.first_position) - (state != nullptr ? state->end : 0);
  }
};

}  // namespace inferlab
