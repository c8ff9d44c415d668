#include "engine/device.h"

#include <fmt/format.h>

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

}  // namespace inferlab
