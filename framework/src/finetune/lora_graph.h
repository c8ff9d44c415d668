// Training through the transformer for low-rank adapters (LoRA, and QLoRA's
// frozen 4-bit base): a forward over a batch of whole sequences that keeps
// what backward needs, the chunked cross-entropy over the vocabulary, and the
// backward pass to every adapter's A and B. The base is frozen: its weights
// get no gradient, only carry it (dX = dY W, with W the model's float32
// weight or its 4-bit copy dequantized one projection at a time). CPU
// (BLAS GEMMs and kernels/cpu/backward.h), float32, in the model's own (GGUF)
// row order; the engine's inference path is the reference its forward
// matches.
#pragma once

#include <array>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "formats/peft_adapter.h"
#include "inferlab/plugin.h"
#include "inferlab/result.h"
#include "model/model.h"

namespace inferlab::finetune {

// The linear projections of a layer an adapter can sit on, by slot.
inline constexpr int kSlots = 7;
inline constexpr std::array<const char*, kSlots> kSlotTensors = peft::kProjectionTensors;
// The slot of a tensor name ("attn_q" ... "ffn_down"), or -1.
int slot_of(const std::string& tensor);

// One trainable adapter: y += scale * (x A^T) B^T on a projection (out, in).
// B's rows are in the model's (GGUF) order: for attn_q and attn_k that is the
// per-head pair order GGUF conversion made, undone when written for PEFT.
struct AdapterTensor {
  int32_t layer = 0;
  int slot = 0;
  int32_t rank = 0;
  float scale = 1.0f;
  int64_t in = 0, out = 0;
  std::vector<float> a;  // (rank, in)
  std::vector<float> b;  // (out, rank)
};

struct AdapterSet {
  std::vector<AdapterTensor> adapters;  // by layer, then slot
  int64_t parameter_count() const;
};

// PEFT's initialization: A uniform in +-1/sqrt(in) (kaiming_uniform with
// a = sqrt(5)), B zero, so training starts from the base model exactly.
struct AdapterInit {
  int32_t rank = 8;
  double alpha = 16;
  bool rslora = false;             // scale alpha / sqrt(rank) instead of alpha / rank
  std::vector<int> slots;          // which projections (kSlotTensors indices)
  std::vector<int32_t> layers;     // empty: every layer
  uint64_t seed = 0;
};
Result<AdapterSet> init_adapters(const ModelConfig& config, const AdapterInit& init);

// The same adapters as the engine and the PEFT reader and writer hold them
// (tensor names, LowRankAdapter), and back (the output head's adapter, which
// training does not make, is refused; so are shapes the model does not have).
std::vector<peft::ProjectionAdapter> to_projection_adapters(const AdapterSet& set);
Result<AdapterSet> from_projection_adapters(const ModelConfig& config,
                                            const std::vector<peft::ProjectionAdapter>& adapters);

// Gradients shaped like an AdapterSet's A and B, in its order.
struct AdapterGrads {
  std::vector<std::vector<float>> a, b;
  static AdapterGrads like(const AdapterSet& set);
  void zero();
};

// Sequences of equal length (pad at the end with targets -1: attention is
// causal, so padding never reaches an earlier token). targets[i] is the token
// position i should predict, or -1 for no loss there.
struct Batch {
  int64_t sequences = 0;
  int64_t seq_len = 0;
  std::vector<int32_t> tokens;   // (sequences, seq_len)
  std::vector<int32_t> targets;  // likewise
  // Optional, (sequences * seq_len, n_layers): 1 where a position skips a
  // layer (its hidden state passes through unchanged), as a layer-skipping
  // schedule (SkipDecode) runs the forward. Its K and V at that layer are
  // still computed from its hidden state for any later position that reads
  // them; with a schedule whose later positions skip at least the layers
  // earlier ones skip, none does. Empty: every position runs every layer.
  std::vector<uint8_t> skip;
};

struct GraphOptions {
  // Where the graph runs: the CPU (BLAS), or the GPU (CUDA builds: the same
  // forward, loss and backward in device memory, cuBLAS SGEMMs and
  // kernels/cuda/backward.cuh; sequences up to 8192 tokens).
  bool cuda = false;
  // The frozen base's storage: Model (the model's float32 weights), or a 4-bit
  // copy of every layer projection made at create (QLoRA). The embedding,
  // norms and LM head stay float32, as in QLoRA.
  WeightStorage base;
  bool checkpoint_layers = false;  // keep only each layer's input; recompute the layer in backward
  float dropout = 0;               // on each adapter's input, PEFT's lora_dropout
  int64_t loss_chunk_rows = 64;    // rows of logits alive at once in the cross-entropy
  // Early-exit training (CALM's weighted per-layer loss): exit_weights[l] is
  // the weight of the cross-entropy of the output of layer l through the final
  // norm and LM head; the last entry weighs the model's own output. Empty: the
  // final output alone, weight 1.
  std::vector<float> exit_weights;
};

struct StepResult {
  double loss_sum = 0;  // summed token cross-entropy (nats), weighted over exits when there are several
  int64_t tokens = 0;   // positions with a target
  std::vector<double> exit_loss_sums;  // per layer with a nonzero exit weight (unweighted); else empty
};

struct MemoryStats {
  int64_t base_weight_bytes = 0;       // the frozen layer projections as stored for training
  // The largest total of kept activations and backward buffers seen (on CUDA:
  // the device memory those buffers hold; they stay allocated between calls).
  int64_t peak_activation_bytes = 0;
};

namespace detail {
class DeviceGraph;
}

class LoraGraph {
 public:
  static Result<std::unique_ptr<LoraGraph>> create(std::shared_ptr<const Model> model, const GraphOptions& options);
  ~LoraGraph();
  LoraGraph(const LoraGraph&) = delete;
  LoraGraph& operator=(const LoraGraph&) = delete;

  // Forward and backward: returns the batch's summed loss and token count, and
  // adds grad_scale * d(loss_sum)/d(parameter) to grads (made with
  // AdapterGrads::like(adapters)). dropout_seed picks the dropout masks (the
  // same seed gives the same masks, also when a checkpointed layer is rerun).
  Result<StepResult> forward_backward(const Batch& batch, const AdapterSet& adapters, AdapterGrads& grads,
                                      float grad_scale, uint64_t dropout_seed = 0);
  // The loss only, without dropout.
  Result<StepResult> loss(const Batch& batch, const AdapterSet& adapters);
  // Every position's logits (sequences * seq_len, n_vocab), without dropout:
  // for comparisons with the inference engine on short batches.
  Result<std::vector<float>> logits(const Batch& batch, const AdapterSet& adapters);

  const ModelConfig& config() const;
  MemoryStats memory() const;

 private:
  struct Impl;
  LoraGraph(std::unique_ptr<Impl> impl, std::unique_ptr<detail::DeviceGraph> device);
  std::unique_ptr<Impl> impl_;
  std::unique_ptr<detail::DeviceGraph> device_;  // set when the graph runs on a GPU
};

}  // namespace inferlab::finetune
