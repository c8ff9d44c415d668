#include "engine/backend_factory.h"

namespace inferlab {

#ifndef INFERLAB_HAVE_CUDA
// A build without CUDA: the CUDA backends are an error, never a crash.
Result<std::unique_ptr<Backend>> make_cuda_backend(std::shared_ptr<const Model>, const EngineOptions&, int32_t) {
  return Error{"engine: this build has no CUDA backend (rebuild with -DINFERLAB_CUDA=ON)"};
}

Result<std::unique_ptr<Backend>> make_cuda_random_backend(std::shared_ptr<const Model>, const EngineOptions&, int32_t,
                                                          uint64_t) {
  return Error{"engine: this build has no CUDA backend (rebuild with -DINFERLAB_CUDA=ON)"};
}
#endif

}  // namespace inferlab
