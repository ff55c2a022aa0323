// What the CUDA build compiled, read from nvcc's own macros (framework-free).
#pragma once

namespace gqa::kernels {

int built_cuda_version();         // CUDART_VERSION, e.g. 13000
const char* built_cuda_archs();   // __CUDA_ARCH_LIST__, e.g. "800,900"
const char* built_cutlass_version();  // e.g. "4.2.0"

}  // namespace gqa::kernels
