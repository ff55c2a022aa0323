// merge_states: one warp per row of (..., H); lanes share the parts for the
// weights, then the columns.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>

#include "kernels/cuda_check.h"
#include "kernels/merge_states.h"

namespace gqa::kernels {
namespace {

constexpr int kWarpsPerBlock = 4;

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

template <typename T>
__global__ void __launch_bounds__(32 * kWarpsPerBlock) gqa_merge_states_kernel(const __grid_constant__ MergeStatesParams p) {
  const int lane = threadIdx.x % 32;
  const int64_t row = int64_t(blockIdx.x) * kWarpsPerBlock + threadIdx.x / 32;
  if (row >= p.rows) return;
  const float* lses = p.lses + row;  // part i at lses[i * rows]

  float mx = -INFINITY;
  for (int64_t i = lane; i < p.num_parts; i += 32) mx = fmaxf(mx, lses[i * p.rows]);
#pragma unroll
  for (int o = 16; o > 0; o /= 2) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
  // Every part -inf: shift by 0 so that the weights come out 0, not NaN.
  const float shift = mx == -INFINITY ? 0.f : mx;
  float sum = 0.f;
  for (int64_t i = lane; i < p.num_parts; i += 32) sum += expf(lses[i * p.rows] - shift);
#pragma unroll
  for (int o = 16; o > 0; o /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, o);
  // A NaN lse propagates through sum into lse and every weight.
  const float inv = sum == 0.f ? 0.f : 1.f / sum;
  if (lane == 0) p.lse[row] = sum == 0.f ? -INFINITY : logf(sum) + shift;

  const T* outs = static_cast<const T*>(p.outs) + row * p.head_dim;  // part i at outs[i * rows * D]
  T* out = static_cast<T*>(p.out) + row * p.head_dim;
  for (int64_t col = lane; col < p.head_dim; col += 32) {
    float acc = 0.f;
    for (int64_t i = 0; i < p.num_parts; ++i) {
      const float w = expf(lses[i * p.rows] - shift) * inv;
      if (w != 0.f) acc += w * to_float(outs[i * p.rows * p.head_dim + col]);
    }
    out[col] = from_float<T>(acc);
  }
}

}  // namespace

void run_merge_states(const MergeStatesParams& p, cudaStream_t stream) {
  if (p.rows == 0) return;
  const dim3 grid(static_cast<unsigned>((p.rows + kWarpsPerBlock - 1) / kWarpsPerBlock));
  switch (p.dtype) {
    case DType::kFloat32:
      gqa_merge_states_kernel<float><<<grid, 32 * kWarpsPerBlock, 0, stream>>>(p);
      break;
    case DType::kFloat16:
      gqa_merge_states_kernel<__half><<<grid, 32 * kWarpsPerBlock, 0, stream>>>(p);
      break;
    case DType::kBFloat16:
      gqa_merge_states_kernel<__nv_bfloat16><<<grid, 32 * kWarpsPerBlock, 0, stream>>>(p);
      break;
  }
  GQA_CUDA_CHECK_LAUNCH();
}

}  // namespace gqa::kernels
