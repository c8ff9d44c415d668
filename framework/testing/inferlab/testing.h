// The author's kit: what a plugin's own tests (plugins/<name>/tests/*.cpp,
// built into inferlab_plugin_tests) include. It brings
//   - FakeKv: a KvView of one (layer, kv head) the test writes, to drive a
//     policy on crafted keys and positions without an engine;
//   - params({...}), tiny_shape(), make_method(plugin, params);
//   - tiny synthetic models (load_synthetic), random_tokens, the normalized
//     error of two logit traces;
//   - activate_method / run_trace: a plugin made, loaded and installed on an
//     engine, then a prompt and decode steps through it;
//   - EXPECT_DENSE_EQUIVALENT(model, "plugin", params): configured to keep
//     everything, a method must give dense logits;
//   - EXPECT_BATCH_INVARIANT(model, "plugin", params): a sequence inside a
//     continuous batch (Engine::forward_batch) gives its logits alone.
// Everything is in namespace inferlab::test.
#pragma once

#include <algorithm>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include "inferlab/plugin.h"
#include "inferlab/testing/plugins.h"
#include "inferlab/testing/support.h"

namespace inferlab::test {

inline ParamValues params(std::initializer_list<std::pair<const std::string, ParamValue>> values) {
  return ParamValues(std::map<std::string, ParamValue>(values));
}

// A model shape for policy tests: n_layers, kv heads (as many query heads), head_dim, page size.
inline ModelShape tiny_shape(int32_t n_layers = 2, int32_t n_kv_heads = 2, int32_t head_dim = 4,
                             int32_t page_size = 4) {
  return ModelShape{n_layers, n_kv_heads, n_kv_heads, head_dim, 16, 32, 100, 1024, page_size};
}

// A method of a built plugin, its parameters checked and defaulted by the host.
inline MethodHandle make_method(const std::string& plugin, const ParamValues& p) {
  auto handle = plugin_registry().create(plugin, p);
  EXPECT_TRUE(handle.ok()) << (handle.ok() ? "" : handle.message());
  return handle.ok() ? std::move(*handle) : MethodHandle{};
}

// A KV cache of one (layer, kv head) written by the test: the same tokens
// answer for every layer and kv head asked.
class FakeKv final : public KvView {
 public:
  FakeKv(int32_t page_size, int32_t head_dim) : page_size_(page_size), head_dim_(head_dim) {}
  void add(int32_t position, std::vector<float> key) {
    positions_.push_back(position);
    keys_.push_back(std::move(key));
  }
  // Drops the stored indices in `drop`, as the engine's compaction does.
  void keep(const std::vector<int32_t>& drop) {
    std::vector<int32_t> p;
    std::vector<std::vector<float>> k;
    for (size_t i = 0; i < keys_.size(); ++i)
      if (std::find(drop.begin(), drop.end(), int32_t(i)) == drop.end()) {
        p.push_back(positions_[i]);
        k.push_back(keys_[i]);
      }
    positions_ = p;
    keys_ = k;
  }
  int32_t page_size() const override { return page_size_; }
  int32_t n_tokens(int32_t, int32_t) const override { return int32_t(keys_.size()); }
  std::span<const int32_t> positions(int32_t, int32_t) const override { return positions_; }
  const float* key(int32_t, int32_t, int32_t t) const override { return keys_[size_t(t)].data(); }
  const float* value(int32_t, int32_t, int32_t t) const override { return keys_[size_t(t)].data(); }
  int32_t head_dim() const { return head_dim_; }

 private:
  int32_t page_size_, head_dim_;
  std::vector<int32_t> positions_;
  std::vector<std::vector<float>> keys_;
};

}  // namespace inferlab::test
