// Error checks for the kernel layer, which has no torch headers: a failed
// CUDA call throws std::runtime_error, which the op layer's dispatcher turns
// into a Python RuntimeError.
#pragma once

#include <cuda_runtime_api.h>

#include <stdexcept>
#include <string>

#define GQA_CUDA_CHECK(expr)                                                                       \
  do {                                                                                             \
    const cudaError_t gqa_err_ = (expr);                                                           \
    if (gqa_err_ != cudaSuccess) {                                                                 \
      throw std::runtime_error(std::string("gqa_ext CUDA error: ") + cudaGetErrorString(gqa_err_) + \
                               " (" #expr " at " __FILE__ ":" + std::to_string(__LINE__) + ")");   \
    }                                                                                              \
  } while (0)

// After a launch: catches bad launch configurations at once (asynchronous
// faults surface at the next synchronizing call, as for any CUDA op).
#define GQA_CUDA_CHECK_LAUNCH() GQA_CUDA_CHECK(cudaGetLastError())
