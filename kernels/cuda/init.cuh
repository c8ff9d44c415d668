// Device-side initialization of weights: random normal tensors and constants,
// so 7B-shaped random models are created on the GPU without a host copy.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "kernel_types.h"

namespace inferlab::kernels::cuda {

// out(n) of dtype = stddev * random_normal_value(seed, i) (counter_rng.h),
// rounded to dtype: element i depends only on (seed, i), bit-identical to
// cpu::fill_random_normal.
cudaError_t fill_random_normal(void* out, DType dtype, int64_t n, uint64_t seed, float stddev, cudaStream_t stream);

// out(n) of dtype = value.
cudaError_t fill_constant(void* out, DType dtype, int64_t n, float value, cudaStream_t stream);

}  // namespace inferlab::kernels::cuda
