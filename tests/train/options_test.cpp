// Bad options and data are refused with messages that name what is wrong.
#include <gtest/gtest.h>

#include <string>
#include <vector>

#include "inferlab/train.h"

namespace inferlab::train {
namespace options_test {

template <typename R>
void expect_refused(const R& r, const std::string& words) {
  ASSERT_FALSE(r) << "expected an error naming \"" << words << "\"";
  EXPECT_NE(r.message().find(words), std::string::npos) << r.message();
}

TEST(TrainOptions, BadHeadOptionsAreRefused) {
  expect_refused(LowRankHead::create({4, -1, 2, false, true}, 0), "rank must be 0");
  expect_refused(LowRankHead::create({0, 2, 2, false, true}, 0), "in must be positive");
  expect_refused(LowRankHead::create({4, 2, 0, false, true}, 0), "out must be positive");
  expect_refused(LowRankHead::create({4, 0, 2, true, true}, 0), "relu needs a hidden layer");
  expect_refused(LowRankHead::from_parameters({2, 0, 2, false, false}, {}, {1, 2, 3}, {}), "parameter sizes");
}

TEST(TrainOptions, BadTrainingOptionsAreRefused) {
  LowRankHead head = *LowRankHead::create({2, 0, 3, false, true}, 0);
  const std::vector<float> x = {1, 2, 3, 4, 5, 6, 7, 8};  // 4 rows of 2
  const std::vector<uint8_t> y = {1, 0, 0, 0, 1, 0, 0, 0, 1, 1, 0, 0};
  const Dataset data{x, 2, y, {}};
  const auto refused = [&](auto change, const std::string& words) {
    TrainOptions o;
    o.validation_fraction = 0.25;
    change(o);
    expect_refused(train(head, data, o), words);
  };
  refused([](TrainOptions& o) { o.batch_size = 0; }, "batch_size must be positive");
  refused([](TrainOptions& o) { o.max_epochs = 0; }, "max_epochs must be positive");
  refused([](TrainOptions& o) { o.patience = -1; }, "patience must be >= 0");
  refused([](TrainOptions& o) { o.validation_fraction = 1.0; }, "validation_fraction must be in [0, 1)");
  refused([](TrainOptions& o) { o.validation_fraction = -0.1; }, "validation_fraction must be in [0, 1)");
  refused([](TrainOptions& o) { o.validation_fraction = 0.9; }, "leaves no training rows");
  refused([](TrainOptions& o) { o.top_k = 4; }, "top_k must be in [0, out = 3]");
  refused([](TrainOptions& o) { o.min_improvement = -1; }, "min_improvement");
  refused([](TrainOptions& o) { o.adamw.lr = -1; }, "AdamW: lr must be >= 0");
  refused([](TrainOptions& o) { o.adamw.beta1 = 1; }, "AdamW: beta1");
  refused([](TrainOptions& o) { o.adamw.beta2 = -0.5; }, "AdamW: beta2");
  refused([](TrainOptions& o) { o.adamw.weight_decay = -0.01; }, "AdamW: weight_decay");
}

TEST(TrainOptions, BadDataIsRefused) {
  LowRankHead head = *LowRankHead::create({2, 0, 3, false, true}, 0);
  const std::vector<float> x = {1, 2, 3, 4};
  const std::vector<uint8_t> y = {1, 0, 0, 0, 1, 0};
  const TrainOptions o;
  expect_refused(train(head, Dataset{{}, 2, {}, {}}, o), "the dataset is empty");
  expect_refused(train(head, Dataset{x, 4, y, {}}, o), "the dataset has dim 4, the head takes in 2");
  expect_refused(train(head, Dataset{std::span<const float>(x).first(3), 2, y, {}}, o), "not whole rows");
  expect_refused(train(head, Dataset{x, 2, std::span<const uint8_t>(y).first(4), {}}, o), "label width mismatch");
  TrainOptions ce = o;
  ce.loss = LossKind::kSoftmaxCrossEntropy;
  ce.validation_fraction = 0;
  const std::vector<int32_t> one = {1};
  expect_refused(train(head, Dataset{x, 2, {}, one}, ce), "1 classes for 2 rows");
  const std::vector<int32_t> bad = {1, 3};
  expect_refused(train(head, Dataset{x, 2, {}, bad}, ce), "class 3 of row 1 is outside [0, 3)");
}

}  // namespace options_test
}  // namespace inferlab::train
