// Single layers on given inputs (Engine::layer_output, the LayerProbe a
// method's stored calibration gets): a layer run on the inputs a forward pass
// gave it returns what that pass handed the next layer, window by window;
// with a layer's thresholds it returns what a method with those thresholds
// gives there; refused while a method is set or for inputs that are not whole
// windows.
#include <gtest/gtest.h>

#include <vector>

#include "engine/engine.h"
#include "inferlab/testing.h"
#include "model/synthetic_model.h"
#include "sparse_method.h"

namespace inferlab {
namespace test_layer_probe {

std::shared_ptr<Model> model() {
  static std::shared_ptr<Model> m = [] {
    SyntheticModelSpec spec;
    spec.name = "layer-probe";
    spec.n_layers = 3;
    spec.seed = 31;
    return test::load_synthetic(spec);
  }();
  return m;
}

// Every layer's input of one call, in row order.
struct Inputs final : public ForwardObserver {
  uint32_t taps() const override { return kTapHiddenIn; }
  void on_layer(const CalibrationTaps& t) override {
    if (size_t(t.layer) >= by_layer.size()) by_layer.resize(size_t(t.layer) + 1);
    by_layer[size_t(t.layer)].insert(by_layer[size_t(t.layer)].end(), t.hidden_in.begin(), t.hidden_in.end());
  }
  std::vector<std::vector<float>> by_layer;
};

// Two windows of `window` tokens, each its own sequence.
Inputs observe(Engine& engine, int32_t window) {
  Inputs seen;
  for (uint64_t w = 0; w < 2; ++w) {
    auto seq = engine.new_sequence();
    const auto tokens = test::random_tokens(engine.config().n_vocab, window, 40 + w);
    EXPECT_TRUE(engine.forward(*seq, tokens, window, {}, &seen).ok());
  }
  return seen;
}

TEST(LayerProbe, ALayerOnItsInputsGivesTheNextLayersInputs) {
  auto engine = Engine::create(model(), EngineOptions{.page_size = 4});
  ASSERT_TRUE(engine.ok());
  const int32_t window = 12;
  const Inputs dense = observe(**engine, window);
  ASSERT_EQ(dense.by_layer.size(), 3u);
  for (const int32_t l : {0, 1}) {
    std::vector<float> out;
    ASSERT_TRUE((*engine)->layer_output(l, dense.by_layer[size_t(l)], window, {}, out).ok());
    EXPECT_EQ(out, dense.by_layer[size_t(l) + 1]) << "layer " << l;
  }
}

TEST(LayerProbe, ALayersThresholdsActAsAMethodsWould) {
  auto engine = Engine::create(model(), EngineOptions{.page_size = 4});
  ASSERT_TRUE(engine.ok());
  const int32_t window = 10, L = (*engine)->config().n_layers;
  const Inputs dense = observe(**engine, window);
  ActivationSparsity a;  // layer 1 only: the earlier layers' inputs stay dense
  a.input_threshold.assign(size_t(L), {-1, -1, -1, -1, -1, -1, -1});
  a.input_threshold[1] = {0.4f, 0.4f, -1, 0.05f, 0.4f, 0.4f, 0.05f};
  test::SparseMethod m(a);
  ASSERT_TRUE((*engine)->set_method(&m, 0).ok());
  const Inputs sparse = observe(**engine, window);
  std::vector<float> out;
  EXPECT_FALSE((*engine)->layer_output(1, dense.by_layer[1], window, a, out).ok()) << "a method is set";
  ASSERT_TRUE((*engine)->set_method(nullptr, 0).ok());
  ASSERT_EQ(sparse.by_layer[1], dense.by_layer[1]);
  auto other = a;  // thresholds of other layers are ignored
  other.input_threshold[0] = {1, 1, 1, 1, 1, 1, 1};
  ASSERT_TRUE((*engine)->layer_output(1, dense.by_layer[1], window, other, out).ok());
  EXPECT_EQ(out, sparse.by_layer[2]);
  EXPECT_NE(out, dense.by_layer[2]);
  ASSERT_TRUE((*engine)->layer_output(1, dense.by_layer[1], window, {}, out).ok());  // and dense again
  EXPECT_EQ(out, dense.by_layer[2]);
}

TEST(LayerProbe, InputsThatAreNotWholeWindowsAreRefused) {
  auto engine = Engine::create(model(), EngineOptions{.page_size = 4});
  ASSERT_TRUE(engine.ok());
  const int64_t d = (*engine)->config().n_embd;
  std::vector<float> in(static_cast<size_t>(d * 10), 0.5f), out;
  auto s = (*engine)->layer_output(0, in, 4, {}, out);
  ASSERT_FALSE(s.ok());
  EXPECT_NE(s.message().find("not whole windows of 4 tokens"), std::string::npos) << s.message();
  s = (*engine)->layer_output(3, in, 5, {}, out);
  ASSERT_FALSE(s.ok());
  EXPECT_NE(s.message().find("layer 3 of a model of 3 layers"), std::string::npos) << s.message();
  ActivationSparsity short_table;
  short_table.input_threshold.assign(2, {0, 0, 0, 0, 0, 0, 0});
  s = (*engine)->layer_output(0, in, 5, short_table, out);
  ASSERT_FALSE(s.ok());
  EXPECT_NE(s.message().find("input thresholds for 2 layers; the model has 3"), std::string::npos) << s.message();
}

}  // namespace test_layer_probe
}  // namespace inferlab
