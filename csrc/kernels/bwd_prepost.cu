// The backward's row-wise passes around the main kernel: rowsum(dout * out)
// before it, and dQ's conversion from the fp32 accumulator after it. One warp
// per query row (numbered as lse numbers them).
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <type_traits>

#include "kernels/bwd_prepost.h"
#include "kernels/cuda_check.h"
#include "kernels/lse_rows.cuh"

namespace gqa::kernels {
namespace {

constexpr int kWarpsPerBlock = 4;

__device__ __forceinline__ float2 to_float2(__half2 x) { return __half22float2(x); }
__device__ __forceinline__ float2 to_float2(__nv_bfloat162 x) { return __bfloat1622float2(x); }

// The dot product of 8 elements (16 bytes) of a and b, in fp32.
template <typename Element>
__device__ __forceinline__ float dot8(const Element* a, const Element* b) {
  using Pair = std::conditional_t<std::is_same_v<Element, __half>, __half2, __nv_bfloat162>;
  const uint4 va = *reinterpret_cast<const uint4*>(a);
  const uint4 vb = *reinterpret_cast<const uint4*>(b);
  const Pair* pa = reinterpret_cast<const Pair*>(&va);
  const Pair* pb = reinterpret_cast<const Pair*>(&vb);
  float sum = 0.f;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 x = to_float2(pa[i]), y = to_float2(pb[i]);
    sum += x.x * y.x + x.y * y.y;
  }
  return sum;
}

template <typename Element>
__global__ void __launch_bounds__(32 * kWarpsPerBlock) gqa_bwd_dot_do_o_kernel(const __grid_constant__ BwdParams p) {
  const int lane = threadIdx.x % 32;
  const int64_t row = int64_t(blockIdx.x) * kWarpsPerBlock + threadIdx.x / 32;
  if (row >= lse_rows(p)) return;
  const Element* dout =
      static_cast<const Element*>(p.dout) + lse_row_offset(p, row, p.do_batch_stride, p.do_row_stride, p.do_head_stride);
  const Element* out =
      static_cast<const Element*>(p.out) + lse_row_offset(p, row, p.o_batch_stride, p.o_row_stride, p.o_head_stride);
  float sum = 0.f;
  for (int col = lane * 8; col < p.head_dim; col += 256) sum += dot8(dout + col, out + col);
#pragma unroll
  for (int o = 16; o > 0; o /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, o);
  if (lane == 0) p.dsum[row] = sum;
}

template <typename Element>
__global__ void __launch_bounds__(32 * kWarpsPerBlock) gqa_bwd_convert_dq_kernel(const __grid_constant__ BwdParams p) {
  const int lane = threadIdx.x % 32;
  const int64_t row = int64_t(blockIdx.x) * kWarpsPerBlock + threadIdx.x / 32;
  if (row >= lse_rows(p)) return;
  Element* dq = static_cast<Element*>(p.dq) + lse_row_offset(p, row, p.dq_batch_stride, p.dq_row_stride, p.dq_head_stride);
  const float* acc = p.dq_accum + row * p.head_dim;
  for (int col = lane * 4; col < p.head_dim; col += 128) {
    const float4 v = *reinterpret_cast<const float4*>(acc + col);
    const float s = p.softmax_scale;
    store4(dq + col, make_float4(v.x * s, v.y * s, v.z * s, v.w * s));
  }
}

using RowKernel = void (*)(BwdParams);

void launch_rows(RowKernel half_kernel, RowKernel bf16_kernel, const BwdParams& params, cudaStream_t stream) {
  const int64_t rows = lse_rows(params);
  if (rows == 0) return;
  const dim3 grid(static_cast<unsigned>((rows + kWarpsPerBlock - 1) / kWarpsPerBlock));
  (params.dtype == DType::kFloat16 ? half_kernel : bf16_kernel)<<<grid, 32 * kWarpsPerBlock, 0, stream>>>(params);
  GQA_CUDA_CHECK_LAUNCH();
}

}  // namespace

void run_bwd_dot_do_o(const BwdParams& params, cudaStream_t stream) {
  launch_rows(&gqa_bwd_dot_do_o_kernel<__half>, &gqa_bwd_dot_do_o_kernel<__nv_bfloat16>, params, stream);
}

void run_bwd_convert_dq(const BwdParams& params, cudaStream_t stream) {
  launch_rows(&gqa_bwd_convert_dq_kernel<__half>, &gqa_bwd_convert_dq_kernel<__nv_bfloat16>, params, stream);
}

}  // namespace gqa::kernels
