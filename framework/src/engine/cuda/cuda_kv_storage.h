// KV pages in device memory (f16/bf16, or a method's bit planes) for the CUDA backend's pools.
#pragma once

#include <cuda_runtime.h>

#include <memory>

#include "engine/kv_cache.h"
#include "kernel_types.h"

namespace inferlab {

class CudaPageStorage;

// Device storage of element type `dtype`, using `stream` for its copies. The
// storage (and its siblings) share the stream: a pool held by sequences or a
// prefill cache may outlive the engine that created the stream.
std::unique_ptr<KvPageStorage> make_cuda_page_storage(kernels::DType dtype, std::shared_ptr<CUstream_st> stream);
// Device storage of bit-plane records (KvPageFormat::BitPlanes), rows
// quantized on the device as they are appended (std::invalid_argument for
// widths the codec does not take). `dtype` is the engine's, for the kernels'
// descriptor only.
std::unique_ptr<KvPageStorage> make_cuda_bit_plane_storage(kernels::BitPlanes planes, kernels::DType dtype,
                                                           std::shared_ptr<CUstream_st> stream);

// The kernels' descriptor of a pool with CUDA storage (chunk table in device memory).
kernels::KvPages cuda_kv_pages(const KvPagePool& pool);

}  // namespace inferlab
