#include "cuda/device_info.cuh"

#include <cuda_runtime.h>

#include <cstdio>
#include <string>

namespace inferlab::kernels::cuda {

int device_count() {
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess) {
    cudaGetLastError();  // clear the sticky "no driver" error
    return 0;
  }
  return count;
}

std::string device_description(int device) {
  cudaDeviceProp prop{};
  const cudaError_t err = cudaGetDeviceProperties(&prop, device);
  if (err != cudaSuccess) return cudaGetErrorString(err);
  char text[256];
  std::snprintf(text, sizeof(text), "%s (sm_%d%d, %.1f GiB)", prop.name, prop.major, prop.minor,
                double(prop.totalGlobalMem) / double(1ull << 30));
  return text;
}

namespace {
__global__ void probe_kernel() {}
}  // namespace

std::string kernel_image_problem(int device) {
  int previous = 0;
  if (cudaGetDevice(&previous) != cudaSuccess || cudaSetDevice(device) != cudaSuccess) {
    cudaGetLastError();
    return "device " + std::to_string(device) + " cannot be selected";
  }
  cudaFuncAttributes attributes{};
  const cudaError_t err = cudaFuncGetAttributes(&attributes, probe_kernel);
  cudaGetLastError();
  cudaSetDevice(previous);
  if (err == cudaSuccess) return {};
  return device_description(device) + ": this build has no kernels for it (" + cudaGetErrorString(err) +
         "); rebuild with CMAKE_CUDA_ARCHITECTURES set to its architecture";
}

double device_peak_gbs(int device) {
  int clock_khz = 0, bus_bits = 0;
  if (cudaDeviceGetAttribute(&clock_khz, cudaDevAttrMemoryClockRate, device) != cudaSuccess ||
      cudaDeviceGetAttribute(&bus_bits, cudaDevAttrGlobalMemoryBusWidth, device) != cudaSuccess) {
    cudaGetLastError();
    return 0;
  }
  return 2.0 * clock_khz * 1e3 * (bus_bits / 8.0) / 1e9;
}

}  // namespace inferlab::kernels::cuda
