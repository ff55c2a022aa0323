// Split-KV combine: merges the partial outputs of the key splits of each
// query row with the log-sum-exp rule, in fp32.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>

#include "kernels/cuda_check.h"
#include "kernels/fwd_combine.h"
#include "kernels/lse_rows.cuh"

namespace gqa::kernels {
namespace {

constexpr int kMaxSplits = 128;
constexpr int kWarpsPerBlock = 4;

// One warp per query row; lanes hold the splits' weights, then 4 columns
// each per pass over the head dim.
template <typename Element>
__global__ void __launch_bounds__(32 * kWarpsPerBlock) gqa_fwd_combine_kernel(const __grid_constant__ FwdParams p) {
  const int lane = threadIdx.x % 32;
  const int64_t rows = lse_rows(p);
  const int64_t row = int64_t(blockIdx.x) * kWarpsPerBlock + threadIdx.x / 32;
  if (row >= rows) return;
  const int64_t split_stride = rows;  // lse_accum is (splits, rows)

  float lse_part[kMaxSplits / 32];
  float mx = -INFINITY;
#pragma unroll
  for (int i = 0; i < kMaxSplits / 32; ++i) {
    const int s = lane + 32 * i;
    lse_part[i] = s < p.num_splits ? p.lse_accum[s * split_stride + row] : -INFINITY;
    mx = fmaxf(mx, lse_part[i]);
  }
#pragma unroll
  for (int o = 16; o > 0; o /= 2) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
  // Every split empty: the row saw no key.
  const float shift = mx == -INFINITY ? 0.f : mx;
  float sum = 0.f;
#pragma unroll
  for (int i = 0; i < kMaxSplits / 32; ++i) {
    lse_part[i] = expf(lse_part[i] - shift);  // now the split's weight, up to 1/total
    sum += lse_part[i];
  }
#pragma unroll
  for (int o = 16; o > 0; o /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, o);
  const float inv = sum > 0.f ? 1.f / sum : 0.f;

  if (lane == 0) p.lse[row] = sum > 0.f ? logf(sum) + shift : -INFINITY;

  Element* out =
      static_cast<Element*>(p.out) + lse_row_offset(p, row, p.o_batch_stride, p.o_row_stride, p.o_head_stride);
  // Loop bounds are warp-uniform so that every lane takes part in the
  // shuffles that hand out the weights.
  for (int col0 = 0; col0 < p.head_dim; col0 += 128) {
    const int col = col0 + lane * 4;
    const bool active = col < p.head_dim;
    float4 acc = make_float4(0.f, 0.f, 0.f, 0.f);
#pragma unroll
    for (int i = 0; i < kMaxSplits / 32; ++i) {
      for (int src = 0; src < 32 && 32 * i + src < p.num_splits; ++src) {
        const int s = 32 * i + src;
        const float w = __shfl_sync(0xffffffffu, lse_part[i], src) * inv;
        if (active) {
          const float4 o = *reinterpret_cast<const float4*>(p.out_accum + (s * split_stride + row) * p.head_dim + col);
          acc.x += w * o.x;
          acc.y += w * o.y;
          acc.z += w * o.z;
          acc.w += w * o.w;
        }
      }
    }
    if (active) store4(out + col, acc);
  }
}

}  // namespace

int fwd_combine_max_splits() { return kMaxSplits; }

int64_t fwd_combine_rows(const FwdParams& params) { return lse_rows(params); }

void run_fwd_combine(const FwdParams& params, cudaStream_t stream) {
  const int64_t rows = lse_rows(params);
  if (rows == 0) return;
  const dim3 grid(static_cast<unsigned>((rows + kWarpsPerBlock - 1) / kWarpsPerBlock));
  if (params.dtype == DType::kFloat16) {
    gqa_fwd_combine_kernel<__half><<<grid, 32 * kWarpsPerBlock, 0, stream>>>(params);
  } else {
    gqa_fwd_combine_kernel<__nv_bfloat16><<<grid, 32 * kWarpsPerBlock, 0, stream>>>(params);
  }
  GQA_CUDA_CHECK_LAUNCH();
}

}  // namespace gqa::kernels
