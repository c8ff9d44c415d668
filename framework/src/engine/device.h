// Which compute devices this build and this machine offer.
#pragma once

#include <string>

namespace inferlab {

bool cuda_compiled();        // built with the CUDA backend
int cuda_device_count();     // 0 without a GPU, or when not compiled with CUDA
std::string cpu_description();  // model name and core count

// OpenBLAS picks its kernels from the CPU model at load time; on virtual CPUs
// that report an unknown model it falls back to generic SSE3 ("Prescott")
// kernels, 2-3x slower. OPENBLAS_CORETYPE overrides that, but only when set
// before the library loads. Called first in main(): when OpenBLAS chose a generic
// core although the CPU has AVX-512 or AVX2 (and the user set no override), it
// sets the variable and re-executes the program. Returns only when no re-exec
// was needed or it failed.
void select_blas_kernels(char** argv);
std::string blas_core_name();

}  // namespace inferlab
