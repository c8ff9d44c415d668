// LowRankHead's forward and backward and both losses, against a double
// reference and central finite differences of it.
#include <gtest/gtest.h>

#include <cmath>
#include <random>
#include <vector>

#include "inferlab/train.h"

namespace inferlab::train {
namespace head_loss_test {

double uniform(std::mt19937_64& rng) { return static_cast<double>(rng() >> 11) * 0x1.0p-53 * 2.0 - 1.0; }

// The head in double, from the float head's parameters.
struct Reference {
  HeadOptions o;
  std::vector<double> w1, w2, b2;
  explicit Reference(const LowRankHead& h)
      : o(h.options()), w1(h.w1().begin(), h.w1().end()), w2(h.w2().begin(), h.w2().end()),
        b2(h.b2().begin(), h.b2().end()) {}
  std::vector<double> logits(const std::vector<float>& x) const {
    const int64_t rows = static_cast<int64_t>(x.size()) / o.in, hid = o.rank > 0 ? o.rank : o.in;
    std::vector<double> out(static_cast<size_t>(rows * o.out));
    for (int64_t r = 0; r < rows; ++r) {
      std::vector<double> h(static_cast<size_t>(hid));
      for (int64_t i = 0; i < hid; ++i) {
        if (o.rank == 0) {
          h[i] = x[r * o.in + i];
          continue;
        }
        for (int64_t c = 0; c < o.in; ++c) h[i] += w1[i * o.in + c] * x[r * o.in + c];
        if (o.relu) h[i] = std::max(h[i], 0.0);
      }
      for (int64_t j = 0; j < o.out; ++j) {
        double z = o.bias ? b2[j] : 0.0;
        for (int64_t i = 0; i < hid; ++i) z += w2[j * hid + i] * h[i];
        out[r * o.out + j] = z;
      }
    }
    return out;
  }
};

double ref_bce(const std::vector<double>& z, const std::vector<uint8_t>& y, int64_t out, const std::vector<float>& w) {
  double total = 0;
  for (size_t i = 0; i < z.size(); ++i) {
    const double s = 1.0 / (1.0 + std::exp(-z[i]));
    total += y[i] ? -w[i % out] * std::log(s) : -std::log(1.0 - s);
  }
  return total / static_cast<double>(z.size());
}

double ref_ce(const std::vector<double>& z, const std::vector<int32_t>& c, int64_t out) {
  double total = 0;
  for (size_t r = 0; r < c.size(); ++r) {
    double sum = 0;
    for (int64_t j = 0; j < out; ++j) sum += std::exp(z[r * out + j]);
    total += std::log(sum) - z[r * out + c[r]];
  }
  return total / static_cast<double>(c.size());
}

// Within 1e-3 relative (plus 1e-6 absolute for gradients near zero).
void expect_close(double analytic, double numeric, const std::string& what) {
  EXPECT_NEAR(analytic, numeric, 1e-3 * std::abs(numeric) + 1e-6) << what;
}

struct Case {
  HeadOptions options;
  LossKind loss;
};

class TrainHeadGradient : public ::testing::TestWithParam<Case> {};

TEST_P(TrainHeadGradient, MatchesCentralDifferencesOfTheDoubleReference) {
  const Case c = GetParam();
  const int64_t rows = 5, out = c.options.out;
  auto made = LowRankHead::create(c.options, 7);
  ASSERT_TRUE(made) << made.message();
  LowRankHead head = *made;
  std::mt19937_64 rng(11);
  std::vector<float> x(static_cast<size_t>(rows * c.options.in));
  for (float& v : x) v = static_cast<float>(uniform(rng) * 2.0);
  std::vector<uint8_t> labels(static_cast<size_t>(rows * out));
  for (auto& v : labels) v = (rng() % 3 == 0) ? 1 : 0;
  std::vector<int32_t> classes(static_cast<size_t>(rows));
  for (auto& v : classes) v = static_cast<int32_t>(rng() % out);
  const std::vector<float> pw = positive_weights(labels, out, PositiveWeight::kPerOutput);

  std::vector<float> logits(static_cast<size_t>(rows * out));
  Activations kept;
  ASSERT_TRUE(head.forward(x, logits, &kept));
  Reference ref(head);
  const std::vector<double> ref_z = ref.logits(x);
  for (size_t i = 0; i < logits.size(); ++i) EXPECT_NEAR(logits[i], ref_z[i], 1e-5) << "logit " << i;

  auto loss = c.loss == LossKind::kBalancedBce ? balanced_bce(logits, labels, out, pw)
                                               : softmax_cross_entropy(logits, classes, out);
  ASSERT_TRUE(loss) << loss.message();
  auto ref_loss = [&](const std::vector<double>& z) {
    return c.loss == LossKind::kBalancedBce ? ref_bce(z, labels, out, pw) : ref_ce(z, classes, out);
  };
  EXPECT_NEAR(loss->loss, ref_loss(ref_z), 1e-6 * std::abs(ref_loss(ref_z)));
  const double h = 1e-6;
  for (size_t i = 0; i < ref_z.size(); ++i) {  // dL/dlogits
    std::vector<double> plus = ref_z, minus = ref_z;
    plus[i] += h;
    minus[i] -= h;
    expect_close(loss->dlogits[i], (ref_loss(plus) - ref_loss(minus)) / (2 * h), "dlogit " + std::to_string(i));
  }

  HeadGradients grads;
  ASSERT_TRUE(head.backward(x, kept, loss->dlogits, grads));
  const std::vector<std::pair<std::vector<double>*, std::vector<float>*>> tensors = {
      {&ref.w1, &grads.w1}, {&ref.w2, &grads.w2}, {&ref.b2, &grads.b2}};
  const char* names[] = {"w1", "w2", "b2"};
  for (size_t t = 0; t < tensors.size(); ++t) {
    auto& [param, grad] = tensors[t];
    ASSERT_EQ(param->size(), grad->size()) << names[t];
    for (size_t i = 0; i < param->size(); ++i) {
      const double saved = (*param)[i];
      (*param)[i] = saved + h;
      const double up = ref_loss(ref.logits(x));
      (*param)[i] = saved - h;
      const double down = ref_loss(ref.logits(x));
      (*param)[i] = saved;
      expect_close((*grad)[i], (up - down) / (2 * h), std::string(names[t]) + "[" + std::to_string(i) + "]");
    }
  }
}

INSTANTIATE_TEST_SUITE_P(
    Shapes, TrainHeadGradient,
    ::testing::Values(Case{{4, 3, 6, true, true}, LossKind::kBalancedBce},
                      Case{{4, 3, 6, true, true}, LossKind::kSoftmaxCrossEntropy},
                      Case{{4, 3, 6, false, false}, LossKind::kBalancedBce},
                      Case{{4, 2, 5, false, true}, LossKind::kSoftmaxCrossEntropy},
                      Case{{4, 0, 6, false, true}, LossKind::kBalancedBce},
                      Case{{4, 0, 3, false, false}, LossKind::kSoftmaxCrossEntropy}));

TEST(TrainLoss, BalancedBceIsStableForLargeLogits) {
  // softplus(100) = 100 to double precision: (2 * 100 + 100) / 2 elements.
  const std::vector<float> z = {-100.0f, 100.0f};
  const std::vector<uint8_t> y = {1, 0};
  const std::vector<float> w = {2.0f, 2.0f};
  auto l = balanced_bce(z, y, 2, w);
  ASSERT_TRUE(l);
  EXPECT_DOUBLE_EQ(l->loss, 150.0);
  EXPECT_FLOAT_EQ(l->dlogits[0], -1.0f);  // 2 * (sigmoid(-100) - 1) / 2
  EXPECT_FLOAT_EQ(l->dlogits[1], 0.5f);   // sigmoid(100) / 2
}

TEST(TrainLoss, SoftmaxCrossEntropyOfEqualLogitsIsLogOfTheClassCount) {
  const std::vector<float> z(8, 3.0f);
  const std::vector<int32_t> c = {1, 2};
  auto l = softmax_cross_entropy(z, c, 4);
  ASSERT_TRUE(l);
  EXPECT_NEAR(l->loss, std::log(4.0), 1e-12);
  EXPECT_FLOAT_EQ(l->dlogits[0], 0.125f);   // (1/4) / 2 rows
  EXPECT_FLOAT_EQ(l->dlogits[1], -0.375f);  // (1/4 - 1) / 2 rows
}

TEST(TrainLoss, PositiveWeightsAreNegativesOverPositives) {
  // Three rows of two outputs: column 0 has 1 positive, column 1 has 2.
  const std::vector<uint8_t> y = {1, 1, 0, 1, 0, 0};
  EXPECT_EQ(positive_weights(y, 2, PositiveWeight::kPerOutput), (std::vector<float>{2.0f, 0.5f}));
  EXPECT_EQ(positive_weights(y, 2, PositiveWeight::kGlobal), (std::vector<float>{1.0f, 1.0f}));
  EXPECT_EQ(positive_weights(y, 2, PositiveWeight::kNone), (std::vector<float>{1.0f, 1.0f}));
  const std::vector<int64_t> rows = {1, 2};  // column 0 without positives gets 1; column 1: 1 of 2
  EXPECT_EQ(positive_weights(y, 2, PositiveWeight::kPerOutput, rows), (std::vector<float>{1.0f, 1.0f}));
  const std::vector<uint8_t> sparse = {0, 1, 0, 0, 0, 0, 0, 0};  // 1 positive of 8
  EXPECT_EQ(positive_weights(sparse, 4, PositiveWeight::kGlobal), (std::vector<float>(4, 7.0f)));
}

TEST(TrainHead, InitialisationIsDeterministicAndBounded) {
  const HeadOptions o{64, 8, 16, true, true};
  auto a = LowRankHead::create(o, 1), b = LowRankHead::create(o, 1), c = LowRankHead::create(o, 2);
  ASSERT_TRUE(a && b && c);
  EXPECT_EQ(a->w1(), b->w1());
  EXPECT_EQ(a->w2(), b->w2());
  EXPECT_EQ(a->b2(), b->b2());
  EXPECT_NE(a->w1(), c->w1());
  float max1 = 0, max2 = 0;
  for (float v : a->w1()) max1 = std::max(max1, std::abs(v));
  for (float v : a->w2()) max2 = std::max(max2, std::abs(v));
  EXPECT_LE(max1, 1.0f / 8.0f);                // 1/sqrt(in = 64)
  EXPECT_GT(max1, 0.9f / 8.0f);                // and it fills the range
  EXPECT_LE(max2, 1.0f / std::sqrt(8.0f));     // 1/sqrt(rank = 8)
}

}  // namespace head_loss_test
}  // namespace inferlab::train
