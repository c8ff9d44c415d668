// The training loop on toy problems: it learns what is learnable and not
// what is not, it is deterministic, and it stops early keeping the best epoch.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <numeric>
#include <random>
#include <vector>

#include "inferlab/train.h"

namespace inferlab::train {
namespace trainer_test {

double uniform(std::mt19937_64& rng) { return static_cast<double>(rng() >> 11) * 0x1.0p-53 * 2.0 - 1.0; }

// Rows of x uniform in [-1, 1]^dim, and the scores x A^T of a fixed random
// map A (out x dim) of rank `rank` (A = U V, U and V uniform in [-1, 1]), from
// which the labels are made.
struct Toy {
  int64_t rows, dim, out;
  std::vector<float> x;
  std::vector<double> scores;
  std::vector<uint8_t> labels;
  std::vector<int32_t> classes;
  Toy(int64_t rows_, int64_t dim_, int64_t out_, int64_t rank, uint64_t seed) : rows(rows_), dim(dim_), out(out_) {
    std::mt19937_64 rng(seed);
    std::vector<double> u(static_cast<size_t>(out * rank)), v(static_cast<size_t>(rank * dim)),
        a(static_cast<size_t>(out * dim));
    for (double& e : u) e = uniform(rng);
    for (double& e : v) e = uniform(rng);
    for (int64_t j = 0; j < out; ++j)
      for (int64_t c = 0; c < dim; ++c)
        for (int64_t q = 0; q < rank; ++q) a[j * dim + c] += u[j * rank + q] * v[q * dim + c];
    x.resize(static_cast<size_t>(rows * dim));
    for (float& e : x) e = static_cast<float>(uniform(rng));
    scores.assign(static_cast<size_t>(rows * out), 0.0);
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t j = 0; j < out; ++j)
        for (int64_t c = 0; c < dim; ++c) scores[r * out + j] += a[j * dim + c] * x[r * dim + c];
  }
  // Labels: the scores above `sigmas` times their root mean square, so each
  // output is a half-space of x (about 1 in 9 positive at 1.2).
  void threshold_labels(double sigmas) {
    double sq = 0;
    for (double s : scores) sq += s * s;
    const double t = sigmas * std::sqrt(sq / static_cast<double>(scores.size()));
    labels.resize(scores.size());
    for (size_t i = 0; i < scores.size(); ++i) labels[i] = scores[i] > t ? 1 : 0;
  }
  // Labels: the k largest scores of each row (or k random outputs).
  void top_k_labels(int64_t k, bool random, uint64_t seed) {
    std::mt19937_64 rng(seed);
    labels.assign(static_cast<size_t>(rows * out), 0);
    std::vector<int64_t> idx(static_cast<size_t>(out));
    for (int64_t r = 0; r < rows; ++r) {
      std::iota(idx.begin(), idx.end(), 0);
      if (random) {
        for (int64_t i = out - 1; i > 0; --i) std::swap(idx[i], idx[rng() % (i + 1)]);
      } else {
        const double* s = scores.data() + r * out;
        std::sort(idx.begin(), idx.end(), [s](int64_t p, int64_t q) { return s[p] > s[q]; });
      }
      for (int64_t i = 0; i < k; ++i) labels[r * out + idx[i]] = 1;
    }
  }
  // Keeps the rows whose two largest scores differ by more than `gap` times
  // the scores' root mean square.
  void keep_margin(double gap) {
    double sq = 0;
    for (double s : scores) sq += s * s;
    const double t = gap * std::sqrt(sq / static_cast<double>(scores.size()));
    int64_t kept = 0;
    for (int64_t r = 0; r < rows; ++r) {
      std::vector<double> s(scores.begin() + r * out, scores.begin() + (r + 1) * out);
      std::partial_sort(s.begin(), s.begin() + 2, s.end(), std::greater<>());
      if (s[0] - s[1] <= t) continue;
      std::copy_n(x.begin() + r * dim, dim, x.begin() + kept * dim);
      std::copy_n(scores.begin() + r * out, out, scores.begin() + kept * out);
      ++kept;
    }
    rows = kept;
    x.resize(static_cast<size_t>(rows * dim));
    scores.resize(static_cast<size_t>(rows * out));
  }
  void argmax_classes() {
    classes.resize(static_cast<size_t>(rows));
    for (int64_t r = 0; r < rows; ++r)
      classes[r] = static_cast<int32_t>(std::max_element(scores.begin() + r * out, scores.begin() + (r + 1) * out) -
                                        (scores.begin() + r * out));
  }
  Dataset data() const { return Dataset{x, dim, labels, classes}; }
};

TrainOptions toy_options() {
  TrainOptions o;
  o.adamw.lr = 1e-2;
  o.batch_size = 64;
  o.max_epochs = 30;
  o.patience = 5;
  o.validation_fraction = 0.2;
  o.seed = 3;
  return o;
}

// The best epoch's validation recall, also recorded in the test's XML output.
double best_recall(const TrainReport& r) {
  const double recall = r.epochs[static_cast<size_t>(r.best_epoch)].validation.recall;
  ::testing::Test::RecordProperty("best_recall", std::to_string(recall));
  ::testing::Test::RecordProperty("epochs", std::to_string(r.best_epoch) + " of " + std::to_string(r.epochs.size()));
  return recall;
}

TEST(TrainFit, LearnsASeparableMultiLabelProblem) {
  Toy toy(3000, 32, 32, 8, 1);
  toy.threshold_labels(1.2);
  auto head = LowRankHead::create({32, 8, 32, false, true}, 5);
  ASSERT_TRUE(head);
  auto report = train(*head, toy.data(), toy_options());
  ASSERT_TRUE(report) << report.message();
  EXPECT_GE(best_recall(*report), 0.95);
  EXPECT_LT(report->epochs.back().train_loss, report->epochs.front().train_loss / 2);
  // The head it returns scores the validation rows as the report says.
  auto m = evaluate(*head, toy.data(), toy_options(), report->pos_weight, report->validation_rows);
  ASSERT_TRUE(m) << m.message();
  EXPECT_EQ(m->recall, best_recall(*report));
}

TEST(TrainFit, DoesNotLearnRandomLabels) {
  Toy toy(3000, 32, 32, 8, 1);
  toy.top_k_labels(4, true, 9);  // chance recall@4 of 4 positives among 32 outputs: 1/8
  auto head = LowRankHead::create({32, 8, 32, false, true}, 5);
  ASSERT_TRUE(head);
  auto report = train(*head, toy.data(), toy_options());
  ASSERT_TRUE(report) << report.message();
  EXPECT_LT(best_recall(*report), 0.2);
}

TEST(TrainFit, SoftmaxCrossEntropyLearnsASeparableProblem) {
  Toy toy(4000, 16, 8, 16, 2);
  toy.keep_margin(0.2);  // about 3000 rows
  toy.argmax_classes();  // the argmax of a linear map, with a margin: linearly separable
  auto head = LowRankHead::create({16, 0, 8, false, true}, 5);
  ASSERT_TRUE(head);
  TrainOptions o = toy_options();
  o.loss = LossKind::kSoftmaxCrossEntropy;
  o.adamw.lr = 5e-2;
  auto report = train(*head, toy.data(), o);
  ASSERT_TRUE(report) << report.message();
  EXPECT_GE(best_recall(*report), 0.98);
  EXPECT_TRUE(report->pos_weight.empty());
  const Metrics& first = report->epochs.front().validation;
  EXPECT_EQ(first.recall, first.precision);  // both are top-1 accuracy
}

TEST(TrainFit, IsDeterministicFromItsSeeds) {
  Toy toy(600, 8, 12, 8, 4);
  toy.top_k_labels(3, false, 0);
  TrainOptions o = toy_options();
  o.max_epochs = 4;
  o.patience = 0;
  auto run = [&](uint64_t seed) {
    o.seed = seed;
    LowRankHead head = *LowRankHead::create({8, 4, 12, true, true}, 1);
    TrainReport report = *train(head, toy.data(), o);
    return std::make_pair(head, report);
  };
  const auto [h1, r1] = run(3);
  const auto [h2, r2] = run(3);
  const auto [h3, r3] = run(4);
  EXPECT_EQ(h1.w1(), h2.w1());  // float vectors compared element by element, exactly
  EXPECT_EQ(h1.w2(), h2.w2());
  EXPECT_EQ(h1.b2(), h2.b2());
  ASSERT_EQ(r1.epochs.size(), 4u);
  ASSERT_EQ(r1.epochs.size(), r2.epochs.size());
  for (size_t e = 0; e < r1.epochs.size(); ++e) {
    EXPECT_EQ(r1.epochs[e].train_loss, r2.epochs[e].train_loss);
    EXPECT_EQ(r1.epochs[e].validation.loss, r2.epochs[e].validation.loss);
    EXPECT_EQ(r1.epochs[e].validation.recall, r2.epochs[e].validation.recall);
    EXPECT_EQ(r1.epochs[e].validation.precision, r2.epochs[e].validation.precision);
  }
  EXPECT_EQ(r1.validation_rows, r2.validation_rows);
  EXPECT_NE(r1.validation_rows, r3.validation_rows);
  EXPECT_NE(h1.w1(), h3.w1());
  EXPECT_NE(r1.epochs[0].train_loss, r3.epochs[0].train_loss);
}

TEST(TrainFit, SplitsRowsByTheValidationFraction) {
  Toy toy(101, 4, 6, 4, 5);
  toy.top_k_labels(2, false, 0);
  TrainOptions o = toy_options();
  o.max_epochs = 1;
  o.validation_fraction = 0.25;  // round(25.25) = 25 rows
  LowRankHead head = *LowRankHead::create({4, 0, 6, false, true}, 1);
  auto report = train(head, toy.data(), o);
  ASSERT_TRUE(report) << report.message();
  EXPECT_EQ(report->validation_rows.size(), 25u);
  EXPECT_EQ(report->train_rows.size(), 76u);
  std::vector<int64_t> all = report->train_rows;
  all.insert(all.end(), report->validation_rows.begin(), report->validation_rows.end());
  std::sort(all.begin(), all.end());
  std::vector<int64_t> expected(101);
  std::iota(expected.begin(), expected.end(), 0);
  EXPECT_EQ(all, expected);
}

TEST(TrainFit, StopsEarlyWhenRecallPlateausAndKeepsTheBestEpoch) {
  Toy toy(1500, 16, 32, 16, 1);
  toy.top_k_labels(4, true, 9);  // nothing to learn: validation recall wanders around chance
  auto head = LowRankHead::create({16, 16, 32, false, true}, 5);
  ASSERT_TRUE(head);
  TrainOptions o = toy_options();
  o.max_epochs = 100;
  o.patience = 3;
  auto report = train(*head, toy.data(), o);
  ASSERT_TRUE(report) << report.message();
  const auto& epochs = report->epochs;
  EXPECT_TRUE(report->stopped_early);
  EXPECT_LT(epochs.size(), 100u);
  // It stops `patience` epochs after the best one, which is the first with the highest recall.
  EXPECT_EQ(epochs.size(), static_cast<size_t>(report->best_epoch + 1 + o.patience));
  for (const EpochMetrics& e : epochs) {
    if (e.epoch < report->best_epoch) {
      EXPECT_LT(e.validation.recall, best_recall(*report));
    } else if (e.epoch > report->best_epoch) {
      EXPECT_LE(e.validation.recall, best_recall(*report));
    }
  }
  // The head holds the best epoch's parameters: evaluated again, it gives that
  // epoch's validation loss and recall exactly, not the last epoch's.
  auto m = evaluate(*head, toy.data(), o, report->pos_weight, report->validation_rows);
  ASSERT_TRUE(m) << m.message();
  EXPECT_EQ(m->recall, best_recall(*report));
  EXPECT_EQ(m->loss, epochs[static_cast<size_t>(report->best_epoch)].validation.loss);
  EXPECT_NE(m->loss, epochs.back().validation.loss);
}

TEST(TrainFit, WithoutValidationItRunsEveryEpochAndKeepsTheLast) {
  Toy toy(200, 4, 6, 4, 5);
  toy.top_k_labels(2, false, 0);
  TrainOptions o = toy_options();
  o.max_epochs = 3;
  o.validation_fraction = 0;
  LowRankHead head = *LowRankHead::create({4, 0, 6, false, true}, 1);
  auto report = train(head, toy.data(), o);
  ASSERT_TRUE(report) << report.message();
  EXPECT_EQ(report->epochs.size(), 3u);
  EXPECT_EQ(report->best_epoch, 2);
  EXPECT_FALSE(report->stopped_early);
  EXPECT_TRUE(std::isnan(report->epochs[0].validation.recall));
  EXPECT_TRUE(report->validation_rows.empty());
}

TEST(TrainFit, RecallAtAFixedKCountsTheTopKOfEachRow) {
  // A linear head with W2 = identity and no bias: the logits are the features.
  auto head = LowRankHead::from_parameters({3, 0, 3, false, false}, {}, {1, 0, 0, 0, 1, 0, 0, 0, 1}, {});
  ASSERT_TRUE(head) << head.message();
  const std::vector<float> x = {3, 2, 1,   // top-1 {0}, top-2 {0, 1}
                                1, 2, 3,   // top-1 {2}, top-2 {2, 1}
                                0, 0, 0};  // no positives: left out
  const std::vector<uint8_t> y = {1, 0, 1,  1, 1, 0,  0, 0, 0};
  TrainOptions o;
  o.top_k = 1;
  auto m = evaluate(*head, Dataset{x, 3, y, {}}, o);
  ASSERT_TRUE(m) << m.message();
  EXPECT_DOUBLE_EQ(m->recall, (0.5 + 0.0) / 2);     // hits / positives per row
  EXPECT_DOUBLE_EQ(m->precision, (1.0 + 0.0) / 2);  // hits / k per row
  o.top_k = 0;                                      // k = positives: 2 and 2
  m = evaluate(*head, Dataset{x, 3, y, {}}, o);
  ASSERT_TRUE(m) << m.message();
  EXPECT_DOUBLE_EQ(m->recall, (0.5 + 0.5) / 2);
  EXPECT_DOUBLE_EQ(m->precision, (0.5 + 0.5) / 2);
}

}  // namespace trainer_test
}  // namespace inferlab::train
