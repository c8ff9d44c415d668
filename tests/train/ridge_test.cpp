// Closed-form ridge regression (train::ridge_regression): exact on noiseless
// data, shrinking with the ridge, and refusing what it cannot solve.
#include <gtest/gtest.h>

#include <cmath>
#include <random>

#include "inferlab/train.h"

namespace inferlab::train {
namespace ridge_test {

struct Problem {
  std::vector<float> x, y, w, b;
};

Problem linear_problem(int64_t rows, int64_t in, int64_t out, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> dist;
  Problem p;
  p.x.resize(size_t(rows * in));
  p.w.resize(size_t(out * in));
  p.b.resize(size_t(out));
  for (float& v : p.x) v = dist(rng);
  for (float& v : p.w) v = dist(rng);
  for (float& v : p.b) v = dist(rng);
  p.y.assign(size_t(rows * out), 0.0f);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t k = 0; k < out; ++k) {
      double acc = p.b[size_t(k)];
      for (int64_t j = 0; j < in; ++j) acc += double(p.x[size_t(r * in + j)]) * p.w[size_t(k * in + j)];
      p.y[size_t(r * out + k)] = float(acc);
    }
  return p;
}

TEST(RidgeRegression, RecoversAnExactLinearMapAndItsBias) {
  const Problem p = linear_problem(1500, 20, 7, 1);  // more rows than one chunk
  std::vector<float> w, b;
  ASSERT_TRUE(ridge_regression(p.x, p.y, 20, 7, 0.0, w, b).ok());
  ASSERT_EQ(w.size(), p.w.size());
  for (size_t i = 0; i < w.size(); ++i) EXPECT_NEAR(w[i], p.w[i], 1e-4);
  for (size_t i = 0; i < b.size(); ++i) EXPECT_NEAR(b[i], p.b[i], 1e-4);
}

TEST(RidgeRegression, TheRidgeShrinksTheWeightsButNotTheBias) {
  const Problem p = linear_problem(200, 5, 1, 2);
  std::vector<float> w0, b0, w1, b1;
  ASSERT_TRUE(ridge_regression(p.x, p.y, 5, 1, 0.0, w0, b0).ok());
  ASSERT_TRUE(ridge_regression(p.x, p.y, 5, 1, 10.0, w1, b1).ok());
  double n0 = 0, n1 = 0;
  for (size_t i = 0; i < w0.size(); ++i) n0 += double(w0[i]) * w0[i], n1 += double(w1[i]) * w1[i];
  EXPECT_LT(n1, 0.1 * n0);
  // With the weights nearly gone, the bias is about the targets' mean.
  double mean = 0;
  for (float v : p.y) mean += v;
  mean /= double(p.y.size());
  EXPECT_NEAR(b1[0], mean, 0.2);
}

TEST(RidgeRegression, RefusesBadShapesAndASingularSystemWithoutRidge) {
  std::vector<float> w, b;
  const std::vector<float> x(12, 1.0f), y(4, 1.0f);
  EXPECT_NE(ridge_regression(std::span<const float>(x.data(), 11), y, 3, 1, 0.1, w, b).message().find("not rows of 3"),
            std::string::npos);
  EXPECT_NE(ridge_regression(x, std::span<const float>(y.data(), 3), 3, 1, 0.1, w, b).message().find("3 targets"),
            std::string::npos);
  EXPECT_NE(ridge_regression(x, y, 3, 1, -1.0, w, b).message().find("ridge"), std::string::npos);
  // Constant columns: singular without a ridge, solvable with one.
  EXPECT_NE(ridge_regression(x, y, 3, 1, 0.0, w, b).message().find("not positive definite"), std::string::npos);
  EXPECT_TRUE(ridge_regression(x, y, 3, 1, 0.1, w, b).ok());
}

}  // namespace ridge_test
}  // namespace inferlab::train
