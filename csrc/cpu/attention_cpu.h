// CPU attention kernels. Each kernel source is compiled once per instruction
// set (DEFAULT, AVX2, AVX512; see CMakeLists.txt) into its own namespace, and
// dispatch_cpu.cpp picks one at run time.
#pragma once

#include <ATen/core/Tensor.h>

#include <algorithm>
#include <cstdint>

namespace gqa::cpu {

// Arguments already validated by the op layer. q is (B, Sq, Hq, D), k and v
// are (B, Sk, Hkv, D), each with a contiguous last dim and any other strides.
// The window is resolved (causal already folded into window_right = 0).
struct AttnParams {
  double softmax_scale;
  double softcap;  // 0 disables
  int64_t window_left;   // -1: unbounded
  int64_t window_right;  // -1: unbounded
};

// Keys visible to query i: [lo, hi], aligned to the bottom-right corner.
// Empty when lo > hi.
struct KeyRange {
  int64_t lo, hi;
};

inline KeyRange visible_keys(int64_t i, int64_t Sq, int64_t Sk, const AttnParams& p) {
  const int64_t diag = i + Sk - Sq;
  const int64_t lo = p.window_left >= 0 ? std::max<int64_t>(0, diag - p.window_left) : 0;
  const int64_t hi = p.window_right >= 0 ? std::min<int64_t>(Sk - 1, diag + p.window_right) : Sk - 1;
  return {lo, hi};
}

// Where each sequence's rows are, for the variable-length and KV-cache ops;
// the default (every pointer null) is the dense case. The int32 arrays are
// host memory, already validated by the op layer.
struct SeqLayout {
  // Packed queries: q and out are (1, Tq, Hq, D), lse is (Hq, Tq), and
  // sequence b is rows cu_seqlens_q[b] to cu_seqlens_q[b + 1].
  const int32_t* cu_seqlens_q = nullptr;
  // Packed keys: k and v are (1, Tk, Hkv, D) likewise.
  const int32_t* cu_seqlens_k = nullptr;
  // A KV cache: sequence b sees its first seqused_k[b] + seqused_k_add rows.
  const int32_t* seqused_k = nullptr;
  int64_t seqused_k_add = 0;
  // Paged K/V, (num_blocks, block_size, Hkv, D): row j of sequence b is row
  // j % block_size of block block_table[b * block_table_stride + j / block_size].
  const int32_t* block_table = nullptr;
  int64_t block_table_stride = 0;
  int64_t block_size = 0;
  int64_t batch = 0;  // B, where q's dim 0 is not it
  int64_t num_splits = 0;  // key splits per sequence: 0 lets the kernel choose

  bool dense() const { return !cu_seqlens_q && !cu_seqlens_k && !seqused_k && !block_table; }
};

// The instruction set the kernels run with: "DEFAULT", "AVX2" or "AVX512".
const char* capability_name();

// out (B, Sq, Hq, D) and lse (B, Hq, Sq) are contiguous and written whole.
void attention_fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                   const AttnParams& p, at::Tensor& out, at::Tensor& lse);

// dq, dk, dv are contiguous with q's and k's shapes and written whole.
// Bitwise repeatable for a given thread count (see attention_bwd_cpu.cpp).
void attention_bwd(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k,
                   const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
                   const AttnParams& p, at::Tensor& dq, at::Tensor& dk, at::Tensor& dv);

// Whether the streaming decode kernel (attention_fwd_decode_cpu.cpp) serves
// a problem with this many rows (query positions x group heads) per KV head:
// float32, bfloat16 or float16 with at most 16 rows, where tile GEMMs would
// spend more time packing than multiplying. At 16 rows it beat the tile GEMMs
// on caches read from memory (8 KV heads, 4096 keys: 6.1 vs 6.7 ms fp32, 5.9
// vs 7.7 ms bf16); on a cache that fits in L3 the GEMMs already win from
// about 12 rows.
inline bool decode_kernel_serves(at::ScalarType dtype, int64_t rows_per_kv_head) {
  const bool fp32_math = dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf;
  return fp32_math && rows_per_kv_head <= 16;
}

// attention_fwd for a problem decode_kernel_serves, with any SeqLayout. q and
// k give the dense shapes: (B, Sq, ...) and (B, Sk, ...), or (1, T, ...) when
// packed; with cu_seqlens_q, Sq is max_seqlen_q. Paged k is the whole cache.
void attention_fwd_decode(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const AttnParams& p,
                          const SeqLayout& seqs, int64_t max_seqlen_q, at::Tensor& out, at::Tensor& lse);

// out (M, D) and lse (M) from N partial results outs (N, M, D) with lses
// (N, M), all contiguous; out has outs' dtype, the rest is float32.
void merge_states(const at::Tensor& outs, const at::Tensor& lses, at::Tensor& out, at::Tensor& lse);

// ---- Ragged batches (sequences_cpu.cpp), on validated arguments ----

// q (Tq, Hq, D), k and v (Tk, Hkv, D) holding B sequences at the offsets of
// the int32 CPU tensors cu_seqlens_q and cu_seqlens_k (B + 1). out (Tq, Hq, D)
// and lse (Hq, Tq) are contiguous and written whole.
void attention_fwd_varlen(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const AttnParams& p,
                          const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q,
                          at::Tensor& out, at::Tensor& lse);

// The gradients of attention_fwd_varlen; dq, dk, dv contiguous, written whole.
void attention_bwd_varlen(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                          const at::Tensor& out, const at::Tensor& lse, const AttnParams& p,
                          const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k, at::Tensor& dq,
                          at::Tensor& dk, at::Tensor& dv);

// A KV cache, contiguous (B, Smax, Hkv, D) or paged (num_blocks, block_size,
// Hkv, D) with block_table (B, max_blocks); positions as in SeqLayout. The
// index tensors are int32 CPU tensors.
struct KvCache {
  const at::Tensor& k;
  const at::Tensor& v;
  const at::Tensor* block_table;  // null: contiguous
};

// Writes k_new and v_new (B, Sq, Hkv, D) at positions cache_seqlens[b] + i.
void kvcache_append(const KvCache& cache, const at::Tensor& k_new, const at::Tensor& v_new,
                    const at::Tensor& cache_seqlens);

// q (B, Sq, Hq, D) against the first seqlens_k[b] + seqlens_add positions of
// each sequence's cache. num_splits: 0 lets the kernel choose. out and lse
// (B, Hq, Sq) contiguous, written whole.
void attention_fwd_kvcache(const at::Tensor& q, const KvCache& cache, const at::Tensor& seqlens_k,
                           int64_t seqlens_add, const AttnParams& p, int64_t num_splits, at::Tensor& out,
                           at::Tensor& lse);

#define GQA_DECLARE_CPU_KERNELS(cap)                                                            \
  namespace cap {                                                                               \
  void attention_fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,            \
                     const AttnParams& p, at::Tensor& out, at::Tensor& lse);                    \
  void attention_bwd(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k,         \
                     const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,         \
                     const AttnParams& p, at::Tensor& dq, at::Tensor& dk, at::Tensor& dv);      \
  void attention_fwd_decode(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,     \
                            const AttnParams& p, const SeqLayout& seqs, int64_t max_seqlen_q,   \
                            at::Tensor& out, at::Tensor& lse);                                  \
  void merge_states(const at::Tensor& outs, const at::Tensor& lses, at::Tensor& out,           \
                    at::Tensor& lse);                                                           \
  }
GQA_DECLARE_CPU_KERNELS(DEFAULT)
GQA_DECLARE_CPU_KERNELS(AVX2)
GQA_DECLARE_CPU_KERNELS(AVX512)
#undef GQA_DECLARE_CPU_KERNELS

}  // namespace gqa::cpu
