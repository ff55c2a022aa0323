#include "kernels/build_info.h"

#include <cuda_runtime_api.h>
#include <cutlass/version.h>

#define GQA_STR_(...) #__VA_ARGS__
#define GQA_STR(...) GQA_STR_(__VA_ARGS__)

namespace gqa::kernels {

int built_cuda_version() { return CUDART_VERSION; }

const char* built_cuda_archs() { return GQA_STR(__CUDA_ARCH_LIST__); }

const char* built_cutlass_version() {
  return GQA_STR(CUTLASS_MAJOR) "." GQA_STR(CUTLASS_MINOR) "." GQA_STR(CUTLASS_PATCH);
}

}  // namespace gqa::kernels
