// What the CPU training graph (lora_graph.cpp) and the CUDA one
// (cuda/lora_graph_cuda.cpp) share: the projections by slot, the checks of a
// call, the dropout masks' keys, and the interface LoraGraph drives a device
// graph through. Internal to the fine-tuning layer.
#pragma once

#include <array>
#include <cstdint>
#include <memory>
#include <utility>
#include <vector>

#include "finetune/lora_graph.h"

namespace inferlab::finetune::detail {

// (out, in) of a slot's projection.
std::pair<int64_t, int64_t> slot_shape(const ModelConfig& c, int slot);
const WeightVector& slot_weight(const LayerWeights& w, int slot);

// A checked call: each (layer, slot)'s adapter index (or -1), and each row's position.
struct CallShape {
  std::vector<std::array<int, kSlots>> index;
  std::vector<int32_t> positions;
  int64_t rows = 0, batch = 0, seq_len = 0;
};
// Refuses batches and adapters that do not fit the model (and gradients not
// shaped like the adapters), naming what is wrong.
Result<CallShape> check_call(const ModelConfig& c, const Batch& b, const AdapterSet& adapters,
                             const AdapterGrads* grads);

// The key of adapter ai's dropout mask for a call with this seed
// (kernels::dropout_factor draws each element from it).
uint64_t dropout_key(uint64_t seed, int ai);

// A training graph on another device, driven by LoraGraph with the same
// contract as its CPU implementation.
class DeviceGraph {
 public:
  virtual ~DeviceGraph() = default;
  // grads null: the loss only, no dropout.
  virtual Result<StepResult> run(const Batch& batch, const AdapterSet& adapters, AdapterGrads* grads,
                                 float grad_scale, uint64_t dropout_seed) = 0;
  virtual Result<std::vector<float>> logits(const Batch& batch, const AdapterSet& adapters) = 0;
  virtual MemoryStats memory() const = 0;
};

// The CUDA graph (CUDA builds only; options already checked by LoraGraph::create).
Result<std::unique_ptr<DeviceGraph>> make_cuda_graph(std::shared_ptr<const Model> model, const GraphOptions& options);

}  // namespace inferlab::finetune::detail
