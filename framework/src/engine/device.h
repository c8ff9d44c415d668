// Which compute devices this build and this machine offer.
#pragma once

#include <string>

namespace inferlab {

bool cuda_compiled();        // built with the CUDA backend
int cuda_device_count();     // 0 without a GPU, or when not compiled with CUDA
std::string cpu_description();  // model name and core count

}  // namespace inferlab
