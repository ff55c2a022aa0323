// The SM80 forward kernel: one thread block owns one (batch, head, block of
// rows[, key split]) and streams K/V tiles through shared memory with an
// online softmax.
//
// Query-group packing (params.pack_gqa): the block's head is a KV head and
// its rows are (query position, query head of the group) pairs, row
// r = position * G + head. Every K/V tile is then loaded into shared memory
// once and multiplied against all G query heads of the group, and a decode
// step (Sq = 1) fills a tile with G real rows instead of 1. Masks use each
// row's own position.
//
// Pipelining (two buffers, K and V): the load of V(n) overlaps S = Q K(n)^T,
// and the load of K(n-1) overlaps the softmax and O += P V(n).
//
// Sequences of their own lengths (packed, or a KV cache's lengths on the
// device) and paged K/V share the one kernel: the grid is sized for the
// longest sequence, each block reads its sequence's lengths first, and
// blocks with no rows of it exit. Key rows are addressed per row, so a
// page boundary may fall anywhere inside a K/V tile.
#pragma once

#include <cute/tensor.hpp>

#include <cfloat>
#include <cmath>

#include "kernels/fwd_params.h"
#include "kernels/fwd_traits_sm80.h"
#include "kernels/utils_sm80.cuh"

namespace gqa::kernels {

template <class Traits>
__global__ void __launch_bounds__(Traits::kNThreads) gqa_fwd_sm80_kernel(const __grid_constant__ FwdParams p) {
  using namespace cute;
  using namespace sm80;
  using Element = typename Traits::Element;
  constexpr int kBlockM = Traits::kBlockM;
  constexpr int kBlockN = Traits::kBlockN;
  constexpr int kNWarps = Traits::kNWarps;
  constexpr int kChunksPerRow = Traits::kChunksPerRow;
  constexpr int kRowsPerPass = Traits::kRowsPerPass;
  constexpr float kLog2e = 1.4426950408889634f;
  constexpr float kLn2 = 0.6931471805599453f;

  extern __shared__ __align__(128) char smem[];

  const int tid = threadIdx.x;
  const int m_block = blockIdx.x;
  const int head = blockIdx.y;  // the KV head when packed, else the query head
  const int batch = blockIdx.z / p.num_splits;
  const int split = blockIdx.z % p.num_splits;

  // This block's sequence: its lengths, and its first query and key rows
  // where sequences are packed.
  const bool varlen_q = p.cu_seqlens_q != nullptr;
  const bool paged = p.block_table != nullptr;
  int seqlen_q = p.seqlen_q, seqlen_k = p.seqlen_k;
  int q_start = 0, k_start = 0;
  if (varlen_q) {
    q_start = p.cu_seqlens_q[batch];
    seqlen_q = p.cu_seqlens_q[batch + 1] - q_start;
  }
  if (p.cu_seqlens_k != nullptr) {
    k_start = p.cu_seqlens_k[batch];
    seqlen_k = p.cu_seqlens_k[batch + 1] - k_start;
  }
  if (p.seqused_k != nullptr) seqlen_k = p.seqused_k[batch] + p.seqused_k_add;

  const int group = p.heads_q / p.heads_kv;
  const int rows_per_pos = p.pack_gqa ? group : 1;
  const int kv_head = p.pack_gqa ? head : head / group;
  const int rows_total = seqlen_q * rows_per_pos;
  const int row0 = m_block * kBlockM;
  if (row0 >= rows_total) return;  // past a shorter sequence's rows: nothing to write
  const int rows_valid = min(kBlockM, rows_total - row0);
  // Query position and head of row r of a block whose first row is `first`.
  auto row_pos_at = [&](int first, int r) { return (first + r) / rows_per_pos; };
  auto row_head_at = [&](int first, int r) {
    return p.pack_gqa ? kv_head * group + (first + r) % rows_per_pos : head;
  };
  auto row_pos = [&](int r) { return row_pos_at(row0, r); };
  auto row_head = [&](int r) { return row_head_at(row0, r); };

  // Keys visible to position i: [key_lo(i), key_hi(i)], aligned bottom-right.
  const int diag = seqlen_k - seqlen_q;
  auto key_lo = [&](int i) { return p.window_left >= 0 ? i + diag - p.window_left : 0; };
  auto key_hi = [&](int i) {
    return p.window_right >= 0 ? min(seqlen_k - 1, i + diag + p.window_right) : seqlen_k - 1;
  };
  const int pos_first = row_pos(0);
  const int pos_last = row_pos(rows_valid - 1);
  // Splits divide this sequence's key blocks, so that short sequences are
  // split as evenly as long ones; a split left with none writes an empty
  // partial (lse -inf), which the combine weighs 0.
  const int n_blocks = (seqlen_k + kBlockN - 1) / kBlockN;
  int n_begin = max(key_lo(pos_first), 0) / kBlockN;
  int n_end = key_hi(pos_last) < 0 ? 0 : min(n_blocks, key_hi(pos_last) / kBlockN + 1);
  if (p.num_splits > 1) {
    const int per_split = (n_blocks + p.num_splits - 1) / p.num_splits;
    n_begin = max(n_begin, split * per_split);
    n_end = min(n_end, (split + 1) * per_split);
  }

  Tensor sQ = make_tensor(make_smem_ptr(reinterpret_cast<Element*>(smem)), typename Traits::SmemLayoutQ{});
  Tensor sK = make_tensor(sQ.data() + size(sQ), typename Traits::SmemLayoutKV{});
  Tensor sV = make_tensor(sK.data() + size(sK), typename Traits::SmemLayoutKV{});
  Tensor sVt = make_tensor(sV.data(), typename Traits::SmemLayoutVt{});
  Tensor sVtNoSwizzle = make_tensor(sV.data().get(), typename Traits::SmemLayoutVtNoSwizzle{});
  Tensor sO = make_tensor(sQ.data(), typename Traits::SmemLayoutQ{});  // Q's buffer, free after the last S

  // Global -> shared: thread tid moves chunk `load_chunk` of rows load_row,
  // load_row + kRowsPerPass, ...; chunks past the head dim are zero-filled.
  const int load_chunk = tid % kChunksPerRow;
  const int load_row = tid / kChunksPerRow;
  const bool chunk_valid = load_chunk * 8 < p.head_dim;
  const Element* q_base = static_cast<const Element*>(p.q) +
                          (varlen_q ? int64_t(q_start) * p.q_row_stride : int64_t(batch) * p.q_batch_stride);
  // Paged: the bases are those of block 0, and each row adds its block's.
  const Element* k_base = static_cast<const Element*>(p.k) + kv_head * p.k_head_stride + load_chunk * 8;
  const Element* v_base = static_cast<const Element*>(p.v) + kv_head * p.v_head_stride + load_chunk * 8;
  if (p.cu_seqlens_k != nullptr) {
    k_base += int64_t(k_start) * p.k_row_stride;
    v_base += int64_t(k_start) * p.v_row_stride;
  } else if (!paged) {
    k_base += int64_t(batch) * p.k_batch_stride;
    v_base += int64_t(batch) * p.v_batch_stride;
  }

  auto load_q = [&]() {
#pragma unroll 1
    for (int i = 0; i < kBlockM / kRowsPerPass; ++i) {
      const int r = load_row + i * kRowsPerPass;
      const bool valid = r < rows_valid && chunk_valid;
      const Element* src = valid ? q_base + row_pos(r) * p.q_row_stride + row_head(r) * p.q_head_stride + load_chunk * 8
                                 : q_base;
      cp_async_16(&sQ(r, load_chunk * 8), src, valid);
    }
  };
  // Row offsets within one (batch, head) are 32-bit (the op layer checks
  // they fit): 64-bit per-row offsets, hoisted out of the key loop, cost the
  // registers that the accumulators need.
  const int k_row_stride = static_cast<int>(p.k_row_stride);
  const int v_row_stride = static_cast<int>(p.v_row_stride);
  const int* page_row = p.block_table + batch * p.block_table_batch_stride;
  auto load_kv = [&](const Element* base, int row_stride, int64_t page_stride, auto& s_tile, int n) {
    CUTE_UNROLL
    for (int i = 0; i < kBlockN / kRowsPerPass; ++i) {
      const int r = load_row + i * kRowsPerPass;
      const int key = n * kBlockN + r;
      const bool valid = key < seqlen_k && chunk_valid;
      const Element* src = base;
      if (valid) {
        if (paged) {
          const int page = p.page_div_mul != 0 ? int(__umulhi(uint32_t(key), p.page_div_mul) >> p.page_div_shift) : key;
          src += int64_t(__ldg(page_row + page)) * page_stride + (key - page * p.page_block_size) * row_stride;
        } else {
          src += key * row_stride;
        }
      }
      cp_async_16(&s_tile(r, load_chunk * 8), src, valid);
    }
  };

  typename Traits::TiledMma tiled_mma;
  auto thr_mma = tiled_mma.get_thread_slice(tid);
  Tensor tSrQ = thr_mma.partition_fragment_A(sQ);
  Tensor tSrK = thr_mma.partition_fragment_B(sK);
  Tensor tOrVt = thr_mma.partition_fragment_B(sVtNoSwizzle);
  Tensor acc_o = partition_fragment_C(tiled_mma, Shape<Int<kBlockM>, Int<Traits::kHeadDim>>{});

  auto copy_q = make_tiled_copy_A(typename Traits::SmemCopyAtom{}, tiled_mma);
  auto thr_copy_q = copy_q.get_thread_slice(tid);
  Tensor tSsQ = thr_copy_q.partition_S(sQ);
  auto copy_k = make_tiled_copy_B(typename Traits::SmemCopyAtom{}, tiled_mma);
  auto thr_copy_k = copy_k.get_thread_slice(tid);
  Tensor tSsK = thr_copy_k.partition_S(sK);
  auto copy_v = make_tiled_copy_B(typename Traits::SmemCopyAtomTransposed{}, tiled_mma);
  auto thr_copy_v = copy_v.get_thread_slice(tid);
  Tensor tOsVt = thr_copy_v.partition_S(sVt);

  // Coordinates (row, col) of every accumulator element of S and of O.
  Tensor tScS = thr_mma.partition_C(make_identity_tensor(Shape<Int<kBlockM>, Int<kBlockN>>{}));
  Tensor tScS_rc = make_tensor(tScS.data(), acc_rowcol(tScS.layout()));
  Tensor tOcO = thr_mma.partition_C(make_identity_tensor(Shape<Int<kBlockM>, Int<Traits::kHeadDim>>{}));
  Tensor tOcO_rc = make_tensor(tOcO.data(), acc_rowcol(tOcO.layout()));
  constexpr int kRows = decltype(size<0>(tScS_rc))::value;  // rows of the tile this thread holds

  float row_max[kRows], row_sum[kRows];
  CUTE_UNROLL
  for (int i = 0; i < kRows; ++i) {
    row_max[i] = -INFINITY;
    row_sum[i] = 0.f;
  }

  // Row fragments of this warp that hold at least one real row.
  const int warp = tid / 32;
  int m_active = 0;
  CUTE_UNROLL
  for (int m = 0; m < size<1>(tSrQ); ++m) {
    if (m * 16 * kNWarps + warp * 16 < rows_valid) m_active = m + 1;
  }

  // Scores go to the log2 domain once: s * scale * log2(e), or with softcap
  // c: c * log2(e) * tanh(s * scale / c).
  const bool use_softcap = p.softcap > 0.f;
  const float score_mul = use_softcap ? p.softmax_scale / p.softcap : p.softmax_scale * kLog2e;
  const float softcap_log2 = p.softcap * kLog2e;

  // Keys every row of the block sees (key_hi stops at the last key).
  const int unmasked_lo = key_lo(pos_last);
  const int unmasked_hi = key_hi(pos_first);

  clear(acc_o);
  if (n_begin < n_end) {
    load_q();
    load_kv(k_base, k_row_stride, p.k_batch_stride, sK, n_end - 1);
    cute::cp_async_fence();
  }

  for (int n = n_end - 1; n >= n_begin; --n) {
    Tensor acc_s = partition_fragment_C(tiled_mma, Shape<Int<kBlockM>, Int<kBlockN>>{});
    clear(acc_s);
    cute::cp_async_wait<0>();
    __syncthreads();  // K(n) (and Q) landed; every thread is done with V(n+1)
    load_kv(v_base, v_row_stride, p.v_batch_stride, sV, n);
    cute::cp_async_fence();

    gemm_smem_smem(acc_s, tSrQ, tSrK, tSsQ, tSsK, tiled_mma, copy_q, copy_k, thr_copy_q, thr_copy_k, m_active);

    Tensor s = make_tensor(acc_s.data(), acc_rowcol(acc_s.layout()));
    if (use_softcap) {
      CUTE_UNROLL
      for (int i = 0; i < size(s); ++i) s(i) = softcap_log2 * fast_tanh(s(i) * score_mul);
    } else {
      CUTE_UNROLL
      for (int i = 0; i < size(s); ++i) s(i) *= score_mul;
    }
    // Only tiles that cross some row's window edge or the end of the keys
    // need the per-element mask.
    const int col0 = n * kBlockN;
    const bool needs_mask = col0 < unmasked_lo || col0 + kBlockN - 1 > unmasked_hi;
    if (needs_mask) {
      CUTE_UNROLL
      for (int i = 0; i < size<0>(s); ++i) {
        // Recomputed per masked tile (few) rather than held in registers.
        const int pos = row_pos(get<0>(tScS_rc(i, 0)));
        const int lo = key_lo(pos) - col0;
        const int hi = key_hi(pos) - col0;
        CUTE_UNROLL
        for (int j = 0; j < size<1>(s); ++j) {
          const int col = get<1>(tScS_rc(i, j));
          if (col < lo || col > hi) s(i, j) = -INFINITY;
        }
      }
    }

    cute::cp_async_wait<0>();
    __syncthreads();  // V(n) landed; every thread is done with K(n)
    if (n > n_begin) {
      load_kv(k_base, k_row_stride, p.k_batch_stride, sK, n - 1);
      cute::cp_async_fence();
    }

    // Online softmax: rescale what was accumulated to the new row maximum.
    Tensor o_rc = make_tensor(acc_o.data(), acc_rowcol(acc_o.layout()));
    CUTE_UNROLL
    for (int i = 0; i < kRows; ++i) {
      float mx = row_max[i];
      CUTE_UNROLL
      for (int j = 0; j < size<1>(s); ++j) mx = fmaxf(mx, s(i, j));
      mx = quad_max(mx);
      // A row that has seen no key yet keeps max -inf; shift by 0 then so
      // that exp2 gives exact zeros instead of NaN.
      const float shift = mx == -INFINITY ? 0.f : mx;
      const float correction = fast_exp2(row_max[i] - shift);
      row_max[i] = mx;
      float sum = 0.f;
      CUTE_UNROLL
      for (int j = 0; j < size<1>(s); ++j) {
        s(i, j) = fast_exp2(s(i, j) - shift);
        sum += s(i, j);
      }
      row_sum[i] = row_sum[i] * correction + sum;
      CUTE_UNROLL
      for (int j = 0; j < size<1>(o_rc); ++j) o_rc(i, j) *= correction;
    }

    Tensor rP = convert_fragment<Element>(acc_s);
    Tensor tOrP = make_tensor(rP.data(), acc_as_a_operand(rP.layout()));
    gemm_reg_smem(acc_o, tOrP, tOrVt, tOsVt, tiled_mma, copy_v, thr_copy_v, m_active);
  }

  // Epilogue: normalize rows; lse in natural log. Rows that saw no key get
  // out 0 and lse -inf. Row positions, heads and the batch are recomputed
  // from opaque copies rather than kept live across the key loop.
  const int row0_late = opaque(row0);
  const int splits_late = opaque(p.num_splits);
  const int batch_late = int(blockIdx.z) / splits_late;
  const int split_late = int(blockIdx.z) - batch_late * splits_late;
  auto out_pos = [&](int r) { return row_pos_at(row0_late, r); };
  auto out_head = [&](int r) { return row_head_at(row0_late, r); };
  Tensor o_rc = make_tensor(acc_o.data(), acc_rowcol(acc_o.layout()));
  float row_lse[kRows];
  CUTE_UNROLL
  for (int i = 0; i < kRows; ++i) {
    const float sum = quad_sum(row_sum[i]);
    const float inv = sum > 0.f ? 1.f / sum : 0.f;
    row_lse[i] = sum > 0.f ? (row_max[i] + __log2f(sum)) * kLn2 : -INFINITY;
    CUTE_UNROLL
    for (int j = 0; j < size<1>(o_rc); ++j) o_rc(i, j) *= inv;
  }

  // Row r's index in lse and in the partials: (b * Hq + h) * Sq + pos, or
  // h * Tq + (the sequence's first row) + pos for packed sequences.
  const int q_start_late = varlen_q ? p.cu_seqlens_q[batch_late] : 0;
  const int64_t lse_seq = varlen_q ? int64_t(q_start_late) : int64_t(batch_late) * p.heads_q * p.seqlen_q;
  const int64_t lse_head_stride = varlen_q ? p.total_q : p.seqlen_q;
  auto lse_index = [&](int r) { return lse_seq + out_head(r) * lse_head_stride + out_pos(r); };
  const int64_t partial_rows = varlen_q ? int64_t(p.heads_q) * p.total_q : int64_t(p.batch) * p.heads_q * p.seqlen_q;

  const bool split_kv = p.num_splits > 1;
  if (tid % 4 == 0) {  // one thread of each quad holds the row's statistics
    CUTE_UNROLL
    for (int i = 0; i < kRows; ++i) {
      const int r = get<0>(tScS_rc(i, 0));
      if (r < rows_valid) {
        const int64_t idx = lse_index(r);
        if (split_kv) {
          p.lse_accum[split_late * partial_rows + idx] = row_lse[i];
        } else {
          p.lse[idx] = row_lse[i];
        }
      }
    }
  }

  if (split_kv) {
    // fp32 partials straight from registers: the combine kernel reads them
    // back once, and they are small next to the K/V a split reads.
    CUTE_UNROLL
    for (int i = 0; i < size<0>(o_rc); ++i) {
      const int r = get<0>(tOcO_rc(i, 0));
      if (r >= rows_valid) continue;
      float* dst = p.out_accum + (split_late * partial_rows + lse_index(r)) * p.head_dim;
      CUTE_UNROLL
      for (int j = 0; j < size<1>(o_rc); j += 2) {
        const int col = get<1>(tOcO_rc(i, j));
        if (col < p.head_dim) *reinterpret_cast<float2*>(dst + col) = make_float2(o_rc(i, j), o_rc(i, j + 1));
      }
    }
    return;
  }

  // Through shared memory, so that each row leaves as 16-byte stores.
  Tensor rO = convert_fragment<Element>(acc_o);
  auto copy_o = make_tiled_copy_C(typename Traits::SmemCopyAtomO{}, tiled_mma);
  auto thr_copy_o = copy_o.get_thread_slice(tid);
  copy(copy_o, thr_copy_o.retile_S(rO), thr_copy_o.partition_D(sO));
  __syncthreads();
  Element* o_base = static_cast<Element*>(p.out) + load_chunk * 8 +
                    (varlen_q ? int64_t(q_start_late) * p.o_row_stride : int64_t(batch_late) * p.o_batch_stride);
#pragma unroll 1
  for (int i = 0; i < kBlockM / kRowsPerPass; ++i) {
    const int r = load_row + i * kRowsPerPass;
    if (r < rows_valid && chunk_valid) {
      *reinterpret_cast<uint4*>(o_base + out_pos(r) * p.o_row_stride + out_head(r) * p.o_head_stride) =
          *reinterpret_cast<const uint4*>(&sO(r, load_chunk * 8));
    }
  }
}

}  // namespace gqa::kernels
