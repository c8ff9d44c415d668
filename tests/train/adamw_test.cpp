// AdamW against values computed by hand (in double) from torch.optim.AdamW's formula.
#include <gtest/gtest.h>

#include <vector>

#include "inferlab/train.h"

namespace inferlab::train {
namespace adamw_test {

TEST(TrainAdamW, DefaultsAreTorchs) {
  const AdamWOptions o;
  EXPECT_EQ(o.lr, 1e-3);
  EXPECT_EQ(o.beta1, 0.9);
  EXPECT_EQ(o.beta2, 0.999);
  EXPECT_EQ(o.eps, 1e-8);
  EXPECT_EQ(o.weight_decay, 0.01);
}

// lr 0.1, weight decay 0.1, betas (0.9, 0.999), eps 1e-8; two tensors,
// a = {1, -2, 0.5} and b = {0}, with the gradients below for steps 1 to 3.
// Per element: p *= 1 - lr*wd; m = 0.9 m + 0.1 g; v = 0.999 v + 0.001 g^2;
// p -= lr / (1 - 0.9^t) * m / (sqrt(v) / sqrt(1 - 0.999^t) + 1e-8). E.g. step
// 1 of a[0]: p = 0.99, m = 0.01, v = 1e-5, so p = 0.99 - 1 * 0.01 / (0.1 + 1e-8)
// = 0.890000009999999.
TEST(TrainAdamW, ThreeStepsMatchTheFormulaInDouble) {
  auto opt = AdamW::create({0.1, 0.9, 0.999, 1e-8, 0.1});
  ASSERT_TRUE(opt) << opt.message();
  std::vector<float> a = {1.0f, -2.0f, 0.5f}, b = {0.0f};
  const float ga[3][3] = {{0.1f, -0.2f, 0.3f}, {-0.05f, 0.4f, 0.3f}, {0.2f, 0.0f, -0.1f}};
  const float gb[3] = {0.0f, 1e-3f, -2.0f};
  const double expect_a[3][3] = {{0.890000009999999, -1.8800000049999999, 0.3950000033333332},
                                 {0.8544663093033908, -1.897810356496037, 0.2910500066333338},
                                 {0.7801104911583474, -1.9071321605830036, 0.22756971473283932}};
  const double expect_b[3] = {0.0, -0.07441263026631013, -0.009815899162065267};
  for (int t = 0; t < 3; ++t) {
    const std::vector<float> grad_a(ga[t], ga[t] + 3), grad_b = {gb[t]};
    const std::vector<Parameter> params = {{a, grad_a}, {b, grad_b}};
    ASSERT_TRUE(opt->step(params));
    for (int i = 0; i < 3; ++i) EXPECT_NEAR(a[i], expect_a[t][i], 2e-6) << "step " << t + 1 << " a[" << i << "]";
    EXPECT_NEAR(b[0], expect_b[t], 2e-6) << "step " << t + 1 << " b[0]";
  }
  EXPECT_EQ(opt->steps(), 3);
  // m and v after three steps, per the same recurrences.
  EXPECT_NEAR(opt->m(0)[2], 0.0413, 1e-8);
  EXPECT_NEAR(opt->v(0)[2], 0.00018973009, 1e-10);
  EXPECT_NEAR(opt->m(1)[0], -0.19991, 1e-7);
  EXPECT_NEAR(opt->v(1)[0], 0.004000000999, 1e-9);
}

TEST(TrainAdamW, AZeroGradientOnlyDecays) {
  auto opt = AdamW::create({0.5, 0.9, 0.999, 1e-8, 0.2});
  ASSERT_TRUE(opt);
  std::vector<float> p = {4.0f, -8.0f};
  const std::vector<float> g = {0.0f, 0.0f};
  const std::vector<Parameter> params = {{p, g}};
  ASSERT_TRUE(opt->step(params));
  EXPECT_FLOAT_EQ(p[0], 3.6f);  // 4 * (1 - 0.5 * 0.2); m = v = 0, so the Adam term is 0
  EXPECT_FLOAT_EQ(p[1], -7.2f);
}

TEST(TrainAdamW, RefusesTensorsThatDoNotMatchItsState) {
  auto opt = AdamW::create({});
  ASSERT_TRUE(opt);
  std::vector<float> p = {1.0f, 2.0f}, q = {1.0f, 2.0f, 3.0f};
  const std::vector<float> g2 = {0.1f, 0.1f}, g3 = {0.1f, 0.1f, 0.1f};
  ASSERT_TRUE(opt->step(std::vector<Parameter>{{p, g2}}));
  auto st = opt->step(std::vector<Parameter>{{q, g3}});
  ASSERT_FALSE(st);
  EXPECT_NE(st.message().find("tensor 0 has 3 values"), std::string::npos) << st.message();
  st = opt->step(std::vector<Parameter>{{p, g2}, {q, g3}});
  ASSERT_FALSE(st);
  EXPECT_NE(st.message().find("2 tensors"), std::string::npos) << st.message();
}

}  // namespace adamw_test
}  // namespace inferlab::train
