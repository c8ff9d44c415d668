// Host-side queries of the CUDA runtime. Safe to call without a GPU or driver.
#pragma once

#include <string>

namespace inferlab::kernels::cuda {

// Number of usable CUDA devices; 0 when there is no driver or no GPU.
int device_count();
// "NVIDIA H100 80GB HBM3 (sm_90, 79.1 GiB)" or the runtime's error text.
std::string device_description(int device);
// Empty when this build's kernels run on `device`, else why not (a GPU older
// than the architectures the kernels were built for, e.g. sm_80 under an
// sm_90 build).
std::string kernel_image_problem(int device);
// Theoretical DRAM bandwidth in GB/s from the memory clock and bus width (two
// transfers per clock); 0 when the runtime cannot tell.
double device_peak_gbs(int device);

}  // namespace inferlab::kernels::cuda
