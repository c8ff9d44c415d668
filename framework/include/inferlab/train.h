// A small trainer for the predictors methods learn: a low-rank (or linear)
// head, two losses, AdamW, a training loop with early stopping, and
// checkpoints. It is the SDK library inferlab_train (static, position
// independent, built with hidden symbols), which a plugin links; it depends on
// OpenBLAS only. Every matrix is float32, row-major. Everything is
// deterministic from its seeds for a fixed OpenBLAS thread count.
#pragma once

#include <cstdint>
#include <random>
#include <span>
#include <string>
#include <vector>

#include "inferlab/result.h"

namespace inferlab::train {

// The head maps in -> rank -> out: h = x W1^T (ReLU on h when relu), logits =
// h W2^T + b2. Rank 0 is a single linear layer in -> out (no W1).
struct HeadOptions {
  int64_t in = 0;
  int64_t rank = 0;
  int64_t out = 0;
  bool relu = false;  // needs rank > 0
  bool bias = true;   // b2; the first layer never has a bias
};

// Gradients of the mean loss, shaped like the head's parameters.
struct HeadGradients {
  std::vector<float> w1, w2, b2;
};

// What forward keeps for backward: the hidden activations (after the ReLU),
// (rows, rank); empty for rank 0, whose hidden activations are x itself.
struct Activations {
  std::vector<float> hidden;
};

class LowRankHead {
 public:
  // Weights and bias uniform in +-1/sqrt(fan_in) (PyTorch's nn.Linear default),
  // drawn from std::mt19937_64(seed) in the order W1, W2, b2.
  static Result<LowRankHead> create(const HeadOptions& options, uint64_t seed);
  // A head from given parameters (a checkpoint); sizes must match options.
  static Result<LowRankHead> from_parameters(const HeadOptions& options, std::vector<float> w1,
                                             std::vector<float> w2, std::vector<float> b2);

  const HeadOptions& options() const { return options_; }
  int64_t hidden() const { return options_.rank > 0 ? options_.rank : options_.in; }

  std::vector<float>& w1() { return w1_; }  // (rank, in); empty for rank 0
  std::vector<float>& w2() { return w2_; }  // (out, hidden())
  std::vector<float>& b2() { return b2_; }  // (out); empty without bias
  const std::vector<float>& w1() const { return w1_; }
  const std::vector<float>& w2() const { return w2_; }
  const std::vector<float>& b2() const { return b2_; }

  // logits (rows, out) of x (rows, in); keeps what backward needs in `keep`.
  Status forward(std::span<const float> x, std::span<float> logits, Activations* keep = nullptr) const;
  // Gradients of the parameters from dL/dlogits (rows, out), for the x and
  // activations of the forward that made those logits; overwrites grads.
  Status backward(std::span<const float> x, const Activations& kept, std::span<const float> dlogits,
                  HeadGradients& grads) const;

 private:
  LowRankHead() = default;
  HeadOptions options_;
  std::vector<float> w1_, w2_, b2_;
};

// A loss's mean over the batch and its gradient dL/dlogits (already divided
// by the number of elements averaged).
struct LossOutput {
  double loss = 0;
  std::vector<float> dlogits;
};

// Binary cross-entropy with logits on multi-hot targets (rows, out), as
// PyTorch's BCEWithLogitsLoss(pos_weight) with mean reduction: the mean over
// all rows*out elements of -(w_j y log s(z) + (1 - y) log(1 - s(z))), with
// log-sigmoid computed stably. pos_weight holds w_j per output; empty means 1.
Result<LossOutput> balanced_bce(std::span<const float> logits, std::span<const uint8_t> targets,
                                int64_t out, std::span<const float> pos_weight);
// Softmax cross-entropy: the mean over rows of -log softmax(z)[class].
Result<LossOutput> softmax_cross_entropy(std::span<const float> logits, std::span<const int32_t> classes,
                                         int64_t out);

// How balanced_bce weighs positives: not at all (1), by negatives/positives
// over all labels (global), or per output column (an output without
// positives or without negatives gets 1).
enum class PositiveWeight { kNone, kGlobal, kPerOutput };
// The weights from multi-hot labels (rows, out), counting the given rows (all when empty).
std::vector<float> positive_weights(std::span<const uint8_t> labels, int64_t out, PositiveWeight mode,
                                    std::span<const int64_t> rows = {});

struct AdamWOptions {
  double lr = 1e-3;
  double beta1 = 0.9;
  double beta2 = 0.999;
  double eps = 1e-8;
  double weight_decay = 0.01;
};

// One parameter tensor and its gradient, as AdamW updates them.
struct Parameter {
  std::span<float> value;
  std::span<const float> grad;
};

// torch.optim.AdamW (amsgrad off): per element, at step t (from 1),
//   p <- p - lr * wd * p
//   m <- b1 m + (1 - b1) g,  v <- b2 v + (1 - b2) g^2
//   p <- p - (lr / (1 - b1^t)) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)
// with m and v float32 and zero at first, one pair per parameter tensor.
class AdamW {
 public:
  static Result<AdamW> create(const AdamWOptions& options);

  // One update of every tensor. The first step sizes the state; each later
  // step must pass the same number of tensors with the same sizes.
  Status step(std::span<const Parameter> params);

  const AdamWOptions& options() const { return options_; }
  void set_lr(double lr) { options_.lr = lr; }
  int64_t steps() const { return steps_; }
  size_t tensors() const { return m_.size(); }
  const std::vector<float>& m(size_t tensor) const { return m_[tensor]; }
  const std::vector<float>& v(size_t tensor) const { return v_[tensor]; }
  // The state a checkpoint saved (steps taken, both moments per tensor), so
  // that the next step is the one an uninterrupted run would take.
  Status restore(int64_t steps, std::vector<std::vector<float>> m, std::vector<std::vector<float>> v);

 private:
  explicit AdamW(const AdamWOptions& options) : options_(options) {}
  AdamWOptions options_;
  int64_t steps_ = 0;
  std::vector<std::vector<float>> m_, v_;
};

// Learning-rate schedules with linear warm-up from 0 over `warmup` steps, then
// constant, or decaying to 0 at `total` steps along a half cosine or a line
// (as transformers' get_{constant,cosine,linear}_schedule_with_warmup).
enum class ScheduleKind { kConstant, kCosine, kLinear };
struct Schedule {
  ScheduleKind kind = ScheduleKind::kConstant;
  int64_t warmup = 0;
  int64_t total = 1;
};
// The learning rate of step `step` (from 0).
double scheduled_lr(double base_lr, const Schedule& schedule, int64_t step);

// torch.nn.utils.clip_grad_norm_: the L2 norm of all gradients together
// (summed in double); when it exceeds max_norm (> 0), every gradient is scaled
// by max_norm / (norm + 1e-6). Returns the norm before clipping.
double clip_grad_norm(std::span<const std::span<float>> grads, double max_norm);

// Fisher-Yates with an unbiased, platform-independent draw: the same order
// for the same generator state everywhere (std::shuffle's is not specified).
void shuffle(std::vector<int64_t>& v, std::mt19937_64& rng);

// The head's parameters and gradients paired in the order W1, W2, b2 (those present).
std::vector<Parameter> parameters(LowRankHead& head, const HeadGradients& grads);

enum class LossKind { kBalancedBce, kSoftmaxCrossEntropy };

// Training rows: features (rows, dim) and, for balanced BCE, multi-hot labels
// (rows, out) or, for softmax cross-entropy, one class per row. Views, not copies.
struct Dataset {
  std::span<const float> features;
  int64_t dim = 0;
  std::span<const uint8_t> labels;
  std::span<const int32_t> classes;
  int64_t rows() const { return dim > 0 ? static_cast<int64_t>(features.size()) / dim : 0; }
};

struct TrainOptions {
  LossKind loss = LossKind::kBalancedBce;
  PositiveWeight positive_weight = PositiveWeight::kPerOutput;  // from the training split's labels
  AdamWOptions adamw;
  int64_t batch_size = 256;
  int32_t max_epochs = 20;
  int32_t patience = 3;                // epochs without a better validation recall before stopping; 0: never
  double min_improvement = 0;          // how much better a recall must be to count as better
  double validation_fraction = 0.1;    // in [0, 1); 0 trains on every row and never stops early
  int32_t top_k = 0;                   // recall@k; 0: k = the row's number of positives
  uint64_t seed = 0;                   // the split and each epoch's order
};

// Metrics over a set of rows. For balanced BCE, recall is the mean over rows
// with at least one positive of |top-k logits ∩ positives| / |positives| and
// precision the mean of |top-k ∩ positives| / k (per-row means, not pooled
// counts; rows without positives are left out). For softmax cross-entropy both
// are top-1 accuracy.
struct Metrics {
  double loss = 0;
  double recall = 0;
  double precision = 0;
};

struct EpochMetrics {
  int32_t epoch = 0;               // from 0
  double train_loss = 0;           // mean over the epoch's mini-batches, weighted by rows
  Metrics validation;              // NaN when there is no validation split
};

struct TrainReport {
  std::vector<EpochMetrics> epochs;
  int32_t best_epoch = 0;          // the epoch whose parameters the head holds at the end
  bool stopped_early = false;
  std::vector<int64_t> train_rows, validation_rows;  // dataset row indices of the split
  std::vector<float> pos_weight;   // what balanced BCE used (empty for cross-entropy)
};

// Trains the head in place with AdamW; with a validation split it ends with
// the parameters of the epoch of best validation recall.
Result<TrainReport> train(LowRankHead& head, const Dataset& data, const TrainOptions& options);

// Metrics of the head on the given rows of data (all rows when empty), in
// mini-batches of options.batch_size, with balanced BCE weighted by pos_weight.
Result<Metrics> evaluate(const LowRankHead& head, const Dataset& data, const TrainOptions& options,
                         std::span<const float> pos_weight = {}, std::span<const int64_t> rows = {});

// Each row of `rows` (rows, width) divided by its RMS, sqrt(mean(x^2) + eps)
// summed in double, with no gain: the features the engine's predictors and
// exit maps read (ComponentPredictors, ExitMap), for training them.
void rms_scale_rows(std::span<float> rows, int64_t width, float eps);

// Closed-form ridge regression with a bias, for linear maps fitted to
// captured activations (e.g. exit heads): W (out, in) and b (out) minimizing
// ||x W^T + 1 b^T - y||^2 + ridge * rows * ||W||^2 over rows of x (rows, in)
// and y (rows, out); b is not penalized. The normal equations are formed and
// solved (Cholesky, LAPACK's dposv from OpenBLAS) in double precision;
// ridge >= 0 (0 needs x of full column rank). Errors: shapes, no rows, a
// system that is not positive definite.
Status ridge_regression(std::span<const float> x, std::span<const float> y, int64_t in, int64_t out, double ridge,
                        std::vector<float>& w, std::vector<float>& b);

// Checkpoints: a little-endian binary file holding a magic, a format version,
// the head's options, its parameters, and an FNV-1a 64-bit checksum of every
// byte before it. save writes a temporary file beside path and renames it.
Status save(const LowRankHead& head, const std::string& path);
Result<LowRankHead> load(const std::string& path);
// Also refuses a head whose options differ from expected.
Result<LowRankHead> load(const std::string& path, const HeadOptions& expected);

// A training state checkpoint (a fine-tuning run's parameters, optimizer
// moments, generator state and position), in the same file discipline as the
// head's: magic, version, named records, an FNV-1a 64 checksum over every
// byte, written to a temporary file and renamed. Records are float32 arrays,
// int64 values or text, each under a unique name.
class StateFile {
 public:
  void put_floats(const std::string& name, std::span<const float> values);
  void put_int(const std::string& name, int64_t value);
  void put_text(const std::string& name, const std::string& text);
  bool has(const std::string& name) const;
  // Errors name the record and what it holds instead.
  Result<std::vector<float>> floats(const std::string& name) const;
  Result<int64_t> integer(const std::string& name) const;
  Result<std::string> text(const std::string& name) const;

  Status save(const std::string& path) const;
  static Result<StateFile> load(const std::string& path);

 private:
  struct Record {
    uint8_t kind = 0;  // 1 floats, 2 int64, 3 text
    std::string bytes;
  };
  std::vector<std::pair<std::string, Record>> records_;
  const Record* find(const std::string& name) const;
  void set_record(const std::string& name, uint8_t kind, std::string bytes);
};

}  // namespace inferlab::train
