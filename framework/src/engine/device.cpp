#include "engine/device.h"

#include <cblas.h>
#include <fmt/format.h>
#include <unistd.h>

#include <cstdlib>

#include <fstream>
#include <thread>

#ifdef INFERLAB_HAVE_CUDA
#include "cuda/device_info.cuh"
#endif

namespace inferlab {

bool cuda_compiled() {
#ifdef INFERLAB_HAVE_CUDA
  return true;
#else
  return false;
#endif
}

int cuda_device_count() {
#ifdef INFERLAB_HAVE_CUDA
  return kernels::cuda::device_count();
#else
  return 0;
#endif
}

std::string cpu_description() {
  std::ifstream cpuinfo("/proc/cpuinfo");
  std::string line, model = "unknown CPU";
  while (std::getline(cpuinfo, line)) {
    if (line.rfind("model name", 0) == 0) {
      model = line.substr(line.find(':') + 2);
      break;
    }
  }
  return fmt::format("{} ({} threads)", model, std::thread::hardware_concurrency());
}

std::string blas_core_name() {
  const char* name = openblas_get_corename();
  return name != nullptr ? name : "unknown";
}

void select_blas_kernels(char** argv) {
  if (std::getenv("OPENBLAS_CORETYPE") != nullptr) return;
  const std::string core = blas_core_name();
  if (core != "Prescott" && core != "Core2" && core != "Nehalem" && core != "unknown") return;
  const char* better = __builtin_cpu_supports("avx512f")  ? "SkylakeX"
                       : __builtin_cpu_supports("avx2") ? "Haswell"
                                                        : nullptr;
  if (better == nullptr) return;
  setenv("OPENBLAS_CORETYPE", better, 1);
  execv("/proc/self/exe", argv);  // returns only on failure: keep the generic kernels
}

}  // namespace inferlab
