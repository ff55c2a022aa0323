// The SM80 backward kernel, GQA-native: one thread block owns one (batch,
// KV head, block of keys). It loads its K and V tiles into shared memory
// once, then walks every query head of the group and every block of query
// rows that sees those keys, accumulating dK and dV for the whole group in
// fp32 registers; it writes them once at the end. There is no G-times
// expanded dK/dV buffer, no atomic on dK/dV, and dK/dV are deterministic.
//
// Each step (query head h, row block m), with P recomputed from lse:
//   S = Q K^T, dP = dO V^T                     (block_m x block_n)
//   P = exp(scale S - lse), dS = P (dP - rowsum(dO O))   [softcap: times 1 - tanh^2]
//   dV += P^T dO, dK += dS^T Q                 (block_n x D, in registers)
//   dQ(h, m) += dS K                           (fp32 atomics into dq_accum)
// dK and dQ get the softmax scale at the end.
//
// dQ's atomics add in whatever order the blocks arrive. With
// params.deterministic the blocks that share a row block (consecutive key
// blocks of one sequence and KV head) add in key-block order instead: each
// waits for its predecessor's turn on a per-(batch, head, row block)
// semaphore. Blocks are dispatched in blockIdx order, with the key block the
// fastest index, so a block only ever waits for one already running.
//
// Pipelining: the next step's Q and dO loads overlap this step's dQ.
#pragma once

#include <cute/tensor.hpp>

#include <cmath>

#include "kernels/bwd_params.h"
#include "kernels/bwd_traits_sm80.h"
#include "kernels/utils_sm80.cuh"

namespace gqa::kernels {

template <class Traits>
__global__ void __launch_bounds__(Traits::kNThreads) gqa_bwd_sm80_kernel(const __grid_constant__ BwdParams p) {
  using namespace cute;
  using namespace sm80;
  using Element = typename Traits::Element;
  constexpr int kBlockM = Traits::kBlockM;
  constexpr int kBlockN = Traits::kBlockN;
  constexpr int kHeadDim = Traits::kHeadDim;
  constexpr int kChunksPerRow = Traits::kChunksPerRow;
  constexpr int kRowsPerPass = Traits::kRowsPerPass;
  constexpr float kLog2e = 1.4426950408889634f;

  extern __shared__ __align__(128) char smem[];

  const int tid = threadIdx.x;
  const int n_block = blockIdx.x;
  const int kv_head = blockIdx.y;
  const int batch = blockIdx.z;

  // This block's sequence.
  const bool varlen = p.cu_seqlens_q != nullptr;
  int seqlen_q = p.seqlen_q, seqlen_k = p.seqlen_k;
  int q_start = 0, k_start = 0;
  if (varlen) {
    q_start = p.cu_seqlens_q[batch];
    seqlen_q = p.cu_seqlens_q[batch + 1] - q_start;
    k_start = p.cu_seqlens_k[batch];
    seqlen_k = p.cu_seqlens_k[batch + 1] - k_start;
  }
  const int key0 = n_block * kBlockN;
  if (key0 >= seqlen_k) return;  // past a shorter sequence's keys: nothing to write
  const int keys_valid = min(kBlockN, seqlen_k - key0);

  // Keys visible to query position i: [key_lo(i), key_hi(i)], aligned bottom-right.
  const int diag = seqlen_k - seqlen_q;
  auto key_lo = [&](int i) { return p.window_left >= 0 ? i + diag - p.window_left : 0; };
  auto key_hi = [&](int i) {
    return p.window_right >= 0 ? min(seqlen_k - 1, i + diag + p.window_right) : seqlen_k - 1;
  };
  // The query positions that see at least one of this block's keys, and the
  // row blocks holding them.
  int pos_lo = 0, pos_hi = seqlen_q - 1;
  if (p.window_right >= 0) pos_lo = max(pos_lo, key0 - diag - p.window_right);
  if (p.window_left >= 0) pos_hi = min(pos_hi, key0 + keys_valid - 1 - diag + p.window_left);
  const int m_begin = pos_lo / kBlockM;
  const int m_blocks = pos_hi < pos_lo ? 0 : pos_hi / kBlockM + 1 - m_begin;
  const int group = p.heads_q / p.heads_kv;
  const int steps = group * m_blocks;
  // Step t is query head kv_head * group + t / m_blocks, row block m_begin + t % m_blocks.
  auto step_head = [&](int t) { return kv_head * group + t / m_blocks; };
  auto step_block = [&](int t) { return m_begin + t % m_blocks; };

  Tensor sQ = make_tensor(make_smem_ptr(reinterpret_cast<Element*>(smem)), typename Traits::SmemLayoutQdO{});
  Tensor sdO = make_tensor(sQ.data() + size(sQ), typename Traits::SmemLayoutQdO{});
  Tensor sK = make_tensor(sdO.data() + size(sdO), typename Traits::SmemLayoutKV{});
  Tensor sV = make_tensor(sK.data() + size(sK), typename Traits::SmemLayoutKV{});
  Tensor sP = make_tensor(sV.data() + size(sV), typename Traits::SmemLayoutPdS{});
  Tensor sdS = make_tensor(sP.data() + size(sP), typename Traits::SmemLayoutPdS{});
  Tensor sQt = make_tensor(sQ.data(), typename Traits::SmemLayoutQdOt{});
  Tensor sdOt = make_tensor(sdO.data(), typename Traits::SmemLayoutQdOt{});
  Tensor sKt = make_tensor(sK.data(), typename Traits::SmemLayoutKt{});
  Tensor sPt = make_tensor(sP.data(), typename Traits::SmemLayoutPdSt{});
  Tensor sdSt = make_tensor(sdS.data(), typename Traits::SmemLayoutPdSt{});
  Tensor sQtNoSwizzle = make_tensor(sQ.data().get(), typename Traits::SmemLayoutQdOtNoSwizzle{});
  Tensor sKtNoSwizzle = make_tensor(sK.data().get(), typename Traits::SmemLayoutKtNoSwizzle{});
  Tensor sPtNoSwizzle = make_tensor(sP.data().get(), typename Traits::SmemLayoutPdStNoSwizzle{});

  // Global -> shared: thread tid moves chunk `load_chunk` of rows load_row,
  // load_row + kRowsPerPass, ...; chunks past the head dim are zero-filled.
  const int load_chunk = tid % kChunksPerRow;
  const int load_row = tid / kChunksPerRow;
  const bool chunk_valid = load_chunk * 8 < p.head_dim;

  auto load_kv = [&](const void* ptr, int64_t batch_stride, int64_t row_stride, int64_t head_stride, auto& s_tile) {
    const Element* base = static_cast<const Element*>(ptr) + kv_head * head_stride + load_chunk * 8 +
                          (varlen ? int64_t(k_start) * row_stride : int64_t(batch) * batch_stride);
#pragma unroll 1
    for (int i = 0; i < kBlockN / kRowsPerPass; ++i) {
      const int r = load_row + i * kRowsPerPass;
      const bool valid = r < keys_valid && chunk_valid;
      cp_async_16(&s_tile(r, load_chunk * 8), valid ? base + int64_t(key0 + r) * row_stride : base, valid);
    }
  };
  // Q and dO rows of step t. Their sequence's offsets and this thread's
  // place in the tile are recomputed from opaque copies at each step rather
  // than kept live across the loop, in registers that dK and dV need.
  auto load_q_do = [&](int t) {
    const int head = step_head(t);
    const int pos0 = step_block(t) * kBlockM;
    const int64_t seq = varlen ? opaque(q_start) : opaque(batch);
    const int tid_t = opaque(tid);
    const int chunk = tid_t % kChunksPerRow, row = tid_t / kChunksPerRow;
    const Element* q_head = static_cast<const Element*>(p.q) + chunk * 8 + head * p.q_head_stride +
                            seq * (varlen ? p.q_row_stride : p.q_batch_stride);
    const Element* do_head = static_cast<const Element*>(p.dout) + chunk * 8 + head * p.do_head_stride +
                             seq * (varlen ? p.do_row_stride : p.do_batch_stride);
#pragma unroll 1
    for (int i = 0; i < kBlockM / kRowsPerPass; ++i) {
      const int r = row + i * kRowsPerPass;
      const bool valid = pos0 + r < seqlen_q && chunk * 8 < p.head_dim;
      cp_async_16(&sQ(r, chunk * 8), valid ? q_head + int64_t(pos0 + r) * p.q_row_stride : q_head, valid);
      cp_async_16(&sdO(r, chunk * 8), valid ? do_head + int64_t(pos0 + r) * p.do_row_stride : do_head, valid);
    }
  };

  // S and dP.
  typename Traits::TiledMmaSdP mma_sdp;
  auto thr_sdp = mma_sdp.get_thread_slice(tid);
  Tensor tSrQ = thr_sdp.partition_fragment_A(sQ);
  Tensor tSrK = thr_sdp.partition_fragment_B(sK);
  Tensor tdPrdO = thr_sdp.partition_fragment_A(sdO);
  Tensor tdPrV = thr_sdp.partition_fragment_B(sV);
  auto copy_sdp_a = make_tiled_copy_A(typename Traits::Atoms::SmemCopyAtom{}, mma_sdp);
  auto thr_copy_sdp_a = copy_sdp_a.get_thread_slice(tid);
  Tensor tSsQ = thr_copy_sdp_a.partition_S(sQ);
  Tensor tdPsdO = thr_copy_sdp_a.partition_S(sdO);
  auto copy_sdp_b = make_tiled_copy_B(typename Traits::Atoms::SmemCopyAtom{}, mma_sdp);
  auto thr_copy_sdp_b = copy_sdp_b.get_thread_slice(tid);
  Tensor tSsK = thr_copy_sdp_b.partition_S(sK);
  Tensor tdPsV = thr_copy_sdp_b.partition_S(sV);
  auto copy_pds = make_tiled_copy_C(typename Traits::Atoms::SmemCopyAtomC{}, mma_sdp);
  auto thr_copy_pds = copy_pds.get_thread_slice(tid);
  Tensor tPsP = thr_copy_pds.partition_D(sP);
  Tensor tdSsdS = thr_copy_pds.partition_D(sdS);
  // Coordinates (row, key) of every S/dP accumulator element. They derive
  // from the thread index, and are recomputed from an opaque copy of it at
  // each use rather than held across the loop: held, they spilled.
  auto coords_sdp = [&] {
    Tensor c = mma_sdp.get_thread_slice(opaque(tid)).partition_C(
        make_identity_tensor(Shape<Int<kBlockM>, Int<kBlockN>>{}));
    return make_tensor(c.data(), acc_rowcol(c.layout()));
  };
  constexpr int kRows = decltype(size<0>(coords_sdp()))::value;
  constexpr int kMmaM = decltype(size<1>(tSrQ))::value;

  // dV and dK.
  typename Traits::TiledMmadKV mma_dkv;
  auto thr_dkv = mma_dkv.get_thread_slice(tid);
  Tensor tdVrPt = thr_dkv.partition_fragment_A(sPtNoSwizzle);
  Tensor tdVrdOt = thr_dkv.partition_fragment_B(sQtNoSwizzle);  // dO^T and Q^T share a shape
  Tensor tdKrdSt = thr_dkv.partition_fragment_A(sPtNoSwizzle);
  Tensor tdKrQt = thr_dkv.partition_fragment_B(sQtNoSwizzle);
  auto copy_dkv_a = make_tiled_copy_A(typename Traits::Atoms::SmemCopyAtomTransposed{}, mma_dkv);
  auto thr_copy_dkv_a = copy_dkv_a.get_thread_slice(tid);
  Tensor tdVsPt = thr_copy_dkv_a.partition_S(sPt);
  Tensor tdKsdSt = thr_copy_dkv_a.partition_S(sdSt);
  auto copy_dkv_b = make_tiled_copy_B(typename Traits::Atoms::SmemCopyAtomTransposed{}, mma_dkv);
  auto thr_copy_dkv_b = copy_dkv_b.get_thread_slice(tid);
  Tensor tdVsdOt = thr_copy_dkv_b.partition_S(sdOt);
  Tensor tdKsQt = thr_copy_dkv_b.partition_S(sQt);
  Tensor acc_dk = partition_fragment_C(mma_dkv, Shape<Int<kBlockN>, Int<kHeadDim>>{});
  Tensor acc_dv = partition_fragment_C(mma_dkv, Shape<Int<kBlockN>, Int<kHeadDim>>{});
  constexpr int kMmaM_dkv = decltype(size<1>(tdVrPt))::value;

  // dQ.
  typename Traits::TiledMmadQ mma_dq;
  auto thr_dq = mma_dq.get_thread_slice(tid);
  Tensor tdQrdS = thr_dq.partition_fragment_A(sdS);
  Tensor tdQrKt = thr_dq.partition_fragment_B(sKtNoSwizzle);
  auto copy_dq_a = make_tiled_copy_A(typename Traits::Atoms::SmemCopyAtom{}, mma_dq);
  auto thr_copy_dq_a = copy_dq_a.get_thread_slice(tid);
  Tensor tdQsdS = thr_copy_dq_a.partition_S(sdS);
  auto copy_dq_b = make_tiled_copy_B(typename Traits::Atoms::SmemCopyAtomTransposed{}, mma_dq);
  auto thr_copy_dq_b = copy_dq_b.get_thread_slice(tid);
  Tensor tdQsKt = thr_copy_dq_b.partition_S(sKt);
  constexpr int kMmaM_dq = decltype(size<1>(tdQrdS))::value;

  // Scores go to the log2 domain: s * scale * log2(e), or with softcap c:
  // c * log2(e) * tanh(s * scale / c).
  const bool use_softcap = p.softcap > 0.f;
  const float score_mul = use_softcap ? p.softmax_scale / p.softcap : p.softmax_scale * kLog2e;
  const float softcap_log2 = p.softcap * kLog2e;
  // Row r of lse, dsum and dq_accum: (b * Hq + h) * Sq + pos, or
  // h * Tq + (the sequence's first row) + pos for packed sequences.
  auto row_index = [&](int head, int pos) {
    return varlen ? int64_t(opaque(q_start)) + int64_t(head) * p.total_q + pos
                  : (int64_t(opaque(batch)) * p.heads_q + head) * p.seqlen_q + pos;
  };
  // Deterministic dQ: the first key block that sees a row block, and the
  // row block's semaphore.
  const int m_blocks_max = (p.seqlen_q + kBlockM - 1) / kBlockM;
  auto first_key_block = [&](int m) { return max(key_lo(m * kBlockM), 0) / kBlockN; };

  clear(acc_dk);
  clear(acc_dv);
  load_kv(p.k, p.k_batch_stride, p.k_row_stride, p.k_head_stride, sK);
  load_kv(p.v, p.v_batch_stride, p.v_row_stride, p.v_head_stride, sV);
  if (steps > 0) load_q_do(0);
  cute::cp_async_fence();

#pragma unroll 1
  for (int t = 0; t < steps; ++t) {
    const int head = step_head(t);
    const int m = step_block(t);
    const int pos0 = m * kBlockM;

    cute::cp_async_wait<0>();
    __syncthreads();  // Q and dO (and K, V) landed; the last step's dQ is done with sdS

    // S, then P from it (stored to shared memory for dV) and W, what dS
    // needs of P: P, times 1 - tanh^2 under softcap. W is kept in the input
    // dtype (as dS will be), so that only half of S's registers stay live
    // through dP's product. Only steps that cross some row's window edge or
    // the end of the keys need the per-element mask; padding rows and rows
    // that see no key get lse +inf, hence P = 0.
    Tensor acc_s = partition_fragment_C(mma_sdp, Shape<Int<kBlockM>, Int<kBlockN>>{});
    clear(acc_s);
    gemm_smem_smem(acc_s, tSrQ, tSrK, tSsQ, tSsK, mma_sdp, copy_sdp_a, copy_sdp_b, thr_copy_sdp_a, thr_copy_sdp_b,
                   kMmaM);
    const int pos_last = min(pos0 + kBlockM, seqlen_q) - 1;
    const bool needs_mask = key0 < key_lo(pos_last) || key0 + kBlockN - 1 > key_hi(pos0);
    Tensor s = make_tensor(acc_s.data(), acc_rowcol(acc_s.layout()));
    Tensor rW = make_tensor<Element>(acc_s.layout());
    Tensor w = make_tensor(rW.data(), acc_rowcol(rW.layout()));
    const auto tScS_rc = coords_sdp();
    CUTE_UNROLL
    for (int i = 0; i < kRows; ++i) {
      const int pos = pos0 + get<0>(tScS_rc(i, 0));
      const float lse = pos < seqlen_q ? p.lse[row_index(head, pos)] : -INFINITY;
      const float lse_log2 = lse == -INFINITY ? INFINITY : lse * kLog2e;
      const int lo = key_lo(pos) - key0;
      const int hi = key_hi(pos) - key0;
      CUTE_UNROLL
      for (int j = 0; j < size<1>(s); ++j) {
        const int col = get<1>(tScS_rc(i, j));
        float prob, weight;
        if (use_softcap) {
          const float th = fast_tanh(s(i, j) * score_mul);
          prob = fast_exp2(softcap_log2 * th - lse_log2);
          weight = prob * (1.f - th * th);
        } else {
          prob = fast_exp2(s(i, j) * score_mul - lse_log2);
          weight = prob;
        }
        if (needs_mask && (col < lo || col > hi)) prob = weight = 0.f;
        s(i, j) = prob;
        w(i, j) = Element(weight);
      }
    }
    Tensor rP = convert_fragment<Element>(acc_s);
    copy(copy_pds, thr_copy_pds.retile_S(rP), tPsP);

    // dP, then dS = W (dP - rowsum(dO O)) in its place.
    Tensor acc_dp = partition_fragment_C(mma_sdp, Shape<Int<kBlockM>, Int<kBlockN>>{});
    clear(acc_dp);
    gemm_smem_smem(acc_dp, tdPrdO, tdPrV, tdPsdO, tdPsV, mma_sdp, copy_sdp_a, copy_sdp_b, thr_copy_sdp_a,
                   thr_copy_sdp_b, kMmaM);
    Tensor dp = make_tensor(acc_dp.data(), acc_rowcol(acc_dp.layout()));
    const auto tdPcdP_rc = coords_sdp();
    CUTE_UNROLL
    for (int i = 0; i < kRows; ++i) {
      const int pos = pos0 + get<0>(tdPcdP_rc(i, 0));
      const float dsum = pos < seqlen_q ? p.dsum[row_index(head, pos)] : 0.f;
      CUTE_UNROLL
      for (int j = 0; j < size<1>(dp); ++j) dp(i, j) = float(w(i, j)) * (dp(i, j) - dsum);
    }
    Tensor rdS = convert_fragment<Element>(acc_dp);
    copy(copy_pds, thr_copy_pds.retile_S(rdS), tdSsdS);
    __syncthreads();  // P and dS visible to every warp

    gemm_smem_smem(acc_dv, tdVrPt, tdVrdOt, tdVsPt, tdVsdOt, mma_dkv, copy_dkv_a, copy_dkv_b, thr_copy_dkv_a,
                   thr_copy_dkv_b, kMmaM_dkv);
    gemm_smem_smem(acc_dk, tdKrdSt, tdKrQt, tdKsdSt, tdKsQt, mma_dkv, copy_dkv_a, copy_dkv_b, thr_copy_dkv_a,
                   thr_copy_dkv_b, kMmaM_dkv);
    __syncthreads();  // every warp is done with sQ, sdO and sP
    if (t + 1 < steps) {
      load_q_do(t + 1);
      cute::cp_async_fence();
    }

    Tensor acc_dq = partition_fragment_C(mma_dq, Shape<Int<kBlockM>, Int<kHeadDim>>{});
    clear(acc_dq);
    gemm_smem_smem(acc_dq, tdQrdS, tdQrKt, tdQsdS, tdQsKt, mma_dq, copy_dq_a, copy_dq_b, thr_copy_dq_a,
                   thr_copy_dq_b, kMmaM_dq);

    int* semaphore = nullptr;
    int order = 0;
    if (p.deterministic) {
      semaphore = p.dq_semaphore + (int64_t(batch) * p.heads_q + head) * m_blocks_max + m;
      order = n_block - first_key_block(m);
      if (tid == 0) {
        while (*reinterpret_cast<volatile int*>(semaphore) != order) {
        }
        __threadfence();
      }
      __syncthreads();
    }
    float* dq_rows = p.dq_accum + row_index(head, pos0) * p.head_dim;
    Tensor tdQcdQ = mma_dq.get_thread_slice(opaque(tid)).partition_C(
        make_identity_tensor(Shape<Int<kBlockM>, Int<kHeadDim>>{}));
    CUTE_UNROLL
    for (int i = 0; i < size(acc_dq); ++i) {
      const int r = get<0>(tdQcdQ(i));
      const int col = get<1>(tdQcdQ(i));
      if (pos0 + r < seqlen_q && col < p.head_dim) atomicAdd(dq_rows + int64_t(r) * p.head_dim + col, acc_dq(i));
    }
    if (p.deterministic) {
      __threadfence();
      __syncthreads();  // every thread's adds are visible before the next block's turn
      if (tid == 0) atomicExch(semaphore, order + 1);
    }
  }

  // Epilogue: dK (scaled) and dV through shared memory (K's and V's
  // buffers, free once every warp is past the last dQ, and landed when no
  // step waited for them), so that each row leaves as 16-byte stores.
  cute::cp_async_wait<0>();
  __syncthreads();
  CUTE_UNROLL
  for (int i = 0; i < size(acc_dk); ++i) acc_dk(i) *= p.softmax_scale;
  Tensor rdK = convert_fragment<Element>(acc_dk);
  Tensor rdV = convert_fragment<Element>(acc_dv);
  auto copy_dkv_c = make_tiled_copy_C(typename Traits::Atoms::SmemCopyAtomC{}, mma_dkv);
  auto thr_copy_dkv_c = copy_dkv_c.get_thread_slice(tid);
  copy(copy_dkv_c, thr_copy_dkv_c.retile_S(rdK), thr_copy_dkv_c.partition_D(sK));
  copy(copy_dkv_c, thr_copy_dkv_c.retile_S(rdV), thr_copy_dkv_c.partition_D(sV));
  __syncthreads();
  auto store_rows = [&](void* ptr, int64_t batch_stride, int64_t row_stride, int64_t head_stride, auto& s_tile) {
    Element* base = static_cast<Element*>(ptr) + kv_head * head_stride + load_chunk * 8 +
                    (varlen ? int64_t(k_start) * row_stride : int64_t(batch) * batch_stride);
#pragma unroll 1
    for (int i = 0; i < kBlockN / kRowsPerPass; ++i) {
      const int r = load_row + i * kRowsPerPass;
      if (r < keys_valid && chunk_valid) {
        *reinterpret_cast<uint4*>(base + int64_t(key0 + r) * row_stride) =
            *reinterpret_cast<const uint4*>(&s_tile(r, load_chunk * 8));
      }
    }
  };
  store_rows(p.dk, p.dk_batch_stride, p.dk_row_stride, p.dk_head_stride, sK);
  store_rows(p.dv, p.dv_batch_stride, p.dv_row_stride, p.dv_head_stride, sV);
}

}  // namespace gqa::kernels
