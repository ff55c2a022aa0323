// KV-cache append: copies rows of k_new and v_new to their positions in
// the (possibly paged) caches.
#include <algorithm>
#include <cstdint>
#include <initializer_list>

#include "kernels/cuda_check.h"
#include "kernels/kv_cache_append.h"

namespace gqa::kernels {
namespace {

constexpr int kThreads = 256;

// Thread-per-chunk copy, Vec wide (16 bytes when every row start is
// 16-byte aligned, else one element). The index is split as (b, i, h,
// chunk) with the chunk fastest, so that a warp's stores cover whole rows.
template <typename Vec>
__global__ void __launch_bounds__(kThreads) gqa_kv_cache_append_kernel(const __grid_constant__ KvCacheAppendParams p) {
  const int chunks = p.head_dim * 2 / int(sizeof(Vec));
  const int64_t total = int64_t(p.batch) * p.seqlen_new * p.heads_kv * chunks;
  for (int64_t idx = int64_t(blockIdx.x) * kThreads + threadIdx.x; idx < total;
       idx += int64_t(gridDim.x) * kThreads) {
    int64_t rest = idx;
    const int c = int(rest % chunks);
    rest /= chunks;
    const int h = int(rest % p.heads_kv);
    rest /= p.heads_kv;
    const int i = int(rest % p.seqlen_new);
    const int b = int(rest / p.seqlen_new);
    const int pos = p.cache_seqlens[b] + i;
    // Cache row: (block or sequence, row within it).
    int64_t slot = b, row = pos;
    if (p.block_table != nullptr) {
      slot = p.block_table[b * p.block_table_batch_stride + pos / p.page_block_size];
      row = pos % p.page_block_size;
    }
    const auto* kn = static_cast<const uint16_t*>(p.k_new) + b * p.kn_batch_stride + i * p.kn_row_stride +
                     h * p.kn_head_stride;
    const auto* vn = static_cast<const uint16_t*>(p.v_new) + b * p.vn_batch_stride + i * p.vn_row_stride +
                     h * p.vn_head_stride;
    auto* kc = static_cast<uint16_t*>(p.k_cache) + slot * p.kc_batch_stride + row * p.kc_row_stride +
               h * p.kc_head_stride;
    auto* vc = static_cast<uint16_t*>(p.v_cache) + slot * p.vc_batch_stride + row * p.vc_row_stride +
               h * p.vc_head_stride;
    reinterpret_cast<Vec*>(kc)[c] = reinterpret_cast<const Vec*>(kn)[c];
    reinterpret_cast<Vec*>(vc)[c] = reinterpret_cast<const Vec*>(vn)[c];
  }
}

bool rows_16b_aligned(const void* base, std::initializer_list<int64_t> strides) {
  if (reinterpret_cast<uintptr_t>(base) % 16 != 0) return false;
  for (int64_t s : strides) {
    if (s % 8 != 0) return false;  // 8 two-byte elements
  }
  return true;
}

}  // namespace

void run_kv_cache_append(const KvCacheAppendParams& p, cudaStream_t stream) {
  const int64_t rows = int64_t(p.batch) * p.seqlen_new * p.heads_kv;
  if (rows == 0 || p.head_dim == 0) return;
  const bool wide =
      p.head_dim % 8 == 0 &&
      rows_16b_aligned(p.k_new, {p.kn_batch_stride, p.kn_row_stride, p.kn_head_stride}) &&
      rows_16b_aligned(p.v_new, {p.vn_batch_stride, p.vn_row_stride, p.vn_head_stride}) &&
      rows_16b_aligned(p.k_cache, {p.kc_batch_stride, p.kc_row_stride, p.kc_head_stride}) &&
      rows_16b_aligned(p.v_cache, {p.vc_batch_stride, p.vc_row_stride, p.vc_head_stride});
  const int64_t total = rows * (wide ? p.head_dim / 8 : p.head_dim);
  // The grid-stride loop covers what a capped grid leaves.
  const unsigned blocks = static_cast<unsigned>(std::min<int64_t>((total + kThreads - 1) / kThreads, 1 << 16));
  if (wide) {
    gqa_kv_cache_append_kernel<uint4><<<blocks, kThreads, 0, stream>>>(p);
  } else {
    gqa_kv_cache_append_kernel<uint16_t><<<blocks, kThreads, 0, stream>>>(p);
  }
  GQA_CUDA_CHECK_LAUNCH();
}

}  // namespace gqa::kernels
