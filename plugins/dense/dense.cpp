// The dense baseline: full attention over the whole KV cache, every layer,
// head and neuron. It implements no hook, so the engine runs unmodified; every
// experiment compares its methods against it.
#include "inferlab/plugin_export.h"

namespace {

class DenseMethod final : public inferlab::Method {};

class DensePlugin final : public inferlab::Plugin {
 public:
  inferlab::PluginInfo info() const override {
    return {"dense", "1.0.0", "baseline: full attention and the whole model, no method hooks",
            inferlab::hooks_of<DenseMethod>(), {}};
  }
  inferlab::Result<std::unique_ptr<inferlab::Method>> create(const inferlab::ParamValues&) const override {
    return std::unique_ptr<inferlab::Method>(std::make_unique<DenseMethod>());
  }
};

}  // namespace

INFERLAB_PLUGIN(DensePlugin)
