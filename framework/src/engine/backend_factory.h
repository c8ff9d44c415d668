// The backends an Engine can be built on. The CUDA ones exist only in a build
// with CUDA; elsewhere they return an error saying so.
#pragma once

#include <memory>

#include "engine/backend.h"
#include "engine/engine.h"

namespace inferlab {

Result<std::unique_ptr<Backend>> make_cpu_backend(std::shared_ptr<const Model> model, const EngineOptions& options,
                                                  int32_t max_context);
// Uploads the model's weights (converted to options.gpu_dtype).
Result<std::unique_ptr<Backend>> make_cuda_backend(std::shared_ptr<const Model> model, const EngineOptions& options,
                                                   int32_t max_context);
// Weights of the model's shape made on the GPU from `seed` (the model has none).
Result<std::unique_ptr<Backend>> make_cuda_random_backend(std::shared_ptr<const Model> model,
                                                          const EngineOptions& options, int32_t max_context,
                                                          uint64_t seed);

}  // namespace inferlab
