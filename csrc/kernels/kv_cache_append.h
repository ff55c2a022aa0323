// Appending new keys and values to a KV cache in place, before a
// forward_kvcache attends over it. No torch types.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace gqa::kernels {

struct KvCacheAppendParams {
  // k_new and v_new (B, S_new, Hkv, D) of 2-byte elements (float16 or
  // bfloat16: the copy does not look at the values). Strides in elements;
  // the last dim is contiguous.
  const void* k_new;
  const void* v_new;
  int64_t kn_batch_stride, kn_row_stride, kn_head_stride;
  int64_t vn_batch_stride, vn_row_stride, vn_head_stride;

  // The caches: (B, Smax, Hkv, D), or paged (num_blocks, page_block_size,
  // Hkv, D) with block_table as in FwdParams (batch strides are then the
  // stride between blocks).
  void* k_cache;
  void* v_cache;
  int64_t kc_batch_stride, kc_row_stride, kc_head_stride;
  int64_t vc_batch_stride, vc_row_stride, vc_head_stride;
  const int* block_table;  // null: contiguous caches
  int64_t block_table_batch_stride;
  int page_block_size;

  // Row i of sequence b goes to position cache_seqlens[b] + i (int32 (B),
  // on the device; the op layer checks, when asked, that it fits).
  const int* cache_seqlens;

  int batch, seqlen_new, heads_kv, head_dim;
};

// One launch writes both k_new and v_new. Throws std::runtime_error on a
// CUDA error.
void run_kv_cache_append(const KvCacheAppendParams& params, cudaStream_t stream);

}  // namespace gqa::kernels
