// Self-speculative decoding (Elhoushi et al., 2024, "LayerSkip: Enabling Early
// Exit Inference and Self-Speculative Decoding"): the model's first
// `exit_layer` layers, with its own final norm and LM head, draft
// `draft_length` tokens greedily; the whole model then checks them in one
// multi-token call, the drafts it agrees with are kept with its own next token,
// and the rest leave the KV cache. The output is the model's own; what changes
// is how many calls through every layer it takes. The plugin only declares the
// exit layer and the draft length (Method::speculation); drafting, verifying
// and truncating are the engine's token loop (Engine::speculate).
//
// Deviation from the paper's implementation: the drafts' KV in the first
// exit_layer layers is computed again by the verifying call instead of being
// reused (LayerSkip's shared KV cache), so a verification costs a full forward
// pass of 1 + draft_length rows.
#include <string>

#include "inferlab/plugin_export.h"

namespace {

using namespace inferlab;

class SelfSpec final : public Method {
 public:
  SelfSpec(int32_t exit_layer, int32_t draft_length) : exit_layer_(exit_layer), draft_length_(draft_length) {}

  Status on_load(const LoadContext& ctx) override {
    if (exit_layer_ >= ctx.shape.n_layers)
      return Error{"selfspec: exit_layer = " + std::to_string(exit_layer_) + " leaves nothing to verify with: the " +
                   "model has " + std::to_string(ctx.shape.n_layers) + " layers (drafts run 1.." +
                   std::to_string(ctx.shape.n_layers - 1) + ")"};
    return ok_status();
  }

  Speculation speculation() const override { return {exit_layer_, draft_length_}; }

  // Nothing changes the prompt's forward pass.
  bool dense_prefill() const override { return true; }

 private:
  int32_t exit_layer_, draft_length_;
};

class SelfSpecPlugin final : public Plugin {
 public:
  PluginInfo info() const override {
    return {"selfspec",
            "1.0.0",
            "self-speculative decoding: draft with the first layers and the LM head, verify with the whole model "
            "(LayerSkip, Elhoushi et al. 2024)",
            hooks_of<SelfSpec>(),
            {ParamSpec::integer("exit_layer", 8, 1, 1 << 16,
                                "layers a draft runs (1 .. the model's layers - 1); their state goes through the "
                                "final norm and LM head"),
             ParamSpec::integer("draft_length", 4, 1, 64, "tokens drafted per verifying call")}};
  }
  Result<std::unique_ptr<Method>> create(const ParamValues& p) const override {
    return std::unique_ptr<Method>(
        std::make_unique<SelfSpec>(int32_t(p.get_int("exit_layer")), int32_t(p.get_int("draft_length"))));
  }
};

}  // namespace

INFERLAB_PLUGIN(SelfSpecPlugin)
