// CPU forward: tiled attention with an online softmax, never materializing
// an Sq x Sk matrix. One task owns (batch, KV head, block of query positions)
// and packs the G query heads of the group into the rows of its tile, so each
// K/V tile is read (and converted or packed) once and used by the whole group.
//
// Tile GEMMs: float32/float64 go to BLAS. bfloat16/float16 go to oneDNN's
// brgemm through ATen (AMX or AVX512-BF16/FP16) where ATen says it can pack
// for it, with fp32 accumulation and P rounded to the input type as
// FlashAttention does; elsewhere they are converted to fp32 for BLAS.
// Decode-shaped problems (a few rows per KV head) go to
// attention_fwd_decode_cpu.cpp instead.
#include "cpu/attention_cpu.h"
#include "cpu/tile_ops.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>

#include <vector>

namespace gqa::cpu {
namespace CPU_CAPABILITY {
namespace {

// Rows of a tile: (query position, head of the group) pairs, ~kRows of them.
// kBlockN keys per K/V tile. The float32 score tile is then 256 KB: with 512
// keys per tile (a 512 KB score tile, as big as a Zen 3 core's whole L2) the
// causal 2048 prefill ran 5-10% slower on a 2-core AMD EPYC.
constexpr int64_t kRows = 256;
constexpr int64_t kBlockN = 256;

template <typename scalar_t>
void fwd_impl(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const AttnParams& p, at::Tensor& out,
              at::Tensor& lse) {
  using acc_t = acc_type<scalar_t>;
  constexpr bool kReduced = !std::is_same_v<scalar_t, acc_t>;
  const int64_t B = q.size(0), Sq = q.size(1), Hq = q.size(2), D = q.size(3);
  const int64_t Sk = k.size(1), Hkv = k.size(2), G = Hq / Hkv;
  const int64_t qsb = q.stride(0), qss = q.stride(1), qsh = q.stride(2);
  const int64_t ksb = k.stride(0), kss = k.stride(1), ksh = k.stride(2);
  const int64_t vsb = v.stride(0), vss = v.stride(1), vsh = v.stride(2);
  const scalar_t* qp = q.const_data_ptr<scalar_t>();
  const scalar_t* kp = k.const_data_ptr<scalar_t>();
  const scalar_t* vp = v.const_data_ptr<scalar_t>();
  scalar_t* op = out.data_ptr<scalar_t>();
  float* lsep = lse.data_ptr<float>();
  const acc_t scale = static_cast<acc_t>(p.softmax_scale);
  const acc_t cap = static_cast<acc_t>(p.softcap);
  const acc_t neg_inf = -std::numeric_limits<acc_t>::infinity();

  const int64_t Mq = std::max<int64_t>(1, kRows / G);  // query positions per tile
  const int64_t n_qblocks = (Sq + Mq - 1) / Mq;
  const int64_t rows_max = Mq * G;
  const int64_t n_tasks = B * Hkv * n_qblocks;

  // Packing K and V costs about what a GEMM with a few rows does, so decode-
  // like shapes (few rows per tile) stay on the fp32 path.
  bool use_brgemm = false;
  if constexpr (kReduced) use_brgemm = at::native::cpublas::could_pack(q.scalar_type()) && Sq * G >= 64;
  const int64_t Dp = round_even(D);

  // brgemm path: K^T and V of every key tile packed once, up front, rather
  // than by each query block that reads them.
  const int64_t n_ktiles = (Sk + kBlockN - 1) / kBlockN;
  const int64_t kt_size = packed_size(D, kBlockN), v_size = packed_size(kBlockN, D);
  at::Tensor k_packed, v_packed;
  if (use_brgemm) {
    k_packed = at::empty({B * Hkv * n_ktiles * kt_size}, q.options());
    v_packed = at::empty({B * Hkv * n_ktiles * v_size}, q.options());
    scalar_t* kpk = k_packed.data_ptr<scalar_t>();
    scalar_t* vpk = v_packed.data_ptr<scalar_t>();
    at::parallel_for(0, B * Hkv * n_ktiles, 1, [&](int64_t begin, int64_t end) {
      std::vector<scalar_t> tmp(std::max(Dp * kBlockN, round_even(kBlockN) * D));
      for (int64_t t = begin; t < end; ++t) {
        const int64_t n0 = t % n_ktiles * kBlockN, hkv = t / n_ktiles % Hkv, b = t / (n_ktiles * Hkv);
        const int64_t nk = std::min(kBlockN, Sk - n0);
        pack_b_transposed(kp + b * ksb + n0 * kss + hkv * ksh, kss, nk, D, tmp.data(), kpk + t * kt_size);
        pack_b(vp + b * vsb + n0 * vss + hkv * vsh, vss, nk, D, tmp.data(), vpk + t * v_size);
      }
    });
  }

  // Split-KV, as flash-decoding does: with fewer tasks than threads (decoding
  // with few KV heads, say), each task's key tiles are split too. Each split
  // leaves its unnormalized output and row max and sum, which are merged in
  // split order afterwards, so results do not depend on scheduling.
  const int64_t n_threads = at::get_num_threads();
  const int64_t n_splits =
      n_tasks >= n_threads ? 1 : std::clamp<int64_t>((n_threads + n_tasks - 1) / n_tasks, 1, std::max<int64_t>(n_ktiles, 1));
  std::vector<acc_t> part_acc, part_m, part_l;  // (task, split, row[, D])
  if (n_splits > 1) {
    part_acc.resize(n_tasks * n_splits * rows_max * D);
    part_m.resize(n_tasks * n_splits * rows_max);
    part_l.resize(n_tasks * n_splits * rows_max);
  }

  // out and lse for the rows of one task.
  const auto write_rows = [&](int64_t task, const acc_t* acc, const acc_t* row_m, const acc_t* row_l) {
    const int64_t qb = task % n_qblocks, hkv = (task / n_qblocks) % Hkv, b = task / (n_qblocks * Hkv);
    const int64_t m0 = qb * Mq, rows = std::min(Mq, Sq - m0) * G;
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t i = m0 + r / G, h = hkv * G + r % G;
      lsep[(b * Hq + h) * Sq + i] = finish_row(acc + r * D, row_m[r], row_l[r], D, op + ((b * Sq + i) * Hq + h) * D);
    }
  };

  at::parallel_for(0, n_tasks * n_splits, 1, [&](int64_t begin, int64_t end) {
    SequentialBlas sequential_blas;
    std::vector<acc_t> s_buf(rows_max * kBlockN), acc(rows_max * D), row_m(rows_max), row_l(rows_max);
    std::vector<KeyRange> ranges(Mq);
    // fp32 BLAS path: Q and, for reduced inputs, K/V in fp32.
    std::vector<acc_t> q_buf, k_buf, v_buf;
    // brgemm path: Q and P in the input type.
    std::vector<scalar_t> q_red, p_red;
    if (use_brgemm) {
      q_red.assign(rows_max * Dp, scalar_t(0));  // the pad column stays zero
      p_red.resize(rows_max * round_even(kBlockN));
    } else {
      q_buf.resize(rows_max * D);
      k_buf.resize(kBlockN * D);
      v_buf.resize(kBlockN * D);
    }

    for (int64_t work = begin; work < end; ++work) {
      const int64_t task = work / n_splits, split = work % n_splits;
      const int64_t qb = task % n_qblocks;
      const int64_t hkv = (task / n_qblocks) % Hkv;
      const int64_t b = task / (n_qblocks * Hkv);
      const int64_t m0 = qb * Mq, mq = std::min(Mq, Sq - m0), rows = mq * G;

      // Rows are ordered (position, head): for one position the group's heads
      // are adjacent in memory, and the output rows come out in that order.
      for (int64_t i = 0; i < mq; ++i) {
        ranges[i] = visible_keys(m0 + i, Sq, Sk, p);
        for (int64_t g = 0; g < G; ++g) {
          const scalar_t* src = qp + b * qsb + (m0 + i) * qss + (hkv * G + g) * qsh;
          if (use_brgemm) {
            std::copy_n(src, D, q_red.data() + (i * G + g) * Dp);
          } else {
            copy_scaled(src, q_buf.data() + (i * G + g) * D, D, acc_t(1));
          }
        }
      }
      fill(row_m.data(), rows, neg_inf);
      fill(row_l.data(), rows, acc_t(0));
      fill(acc.data(), rows * D, acc_t(0));

      // The windows only move forward with the query position. Tiles are
      // aligned to kBlockN so that the brgemm path finds them packed; columns
      // before k_lo are masked like any other.
      const int64_t k_lo = ranges[0].lo, k_hi = ranges[mq - 1].hi;
      const int64_t first = k_lo / kBlockN, n_tiles = k_hi >= k_lo ? k_hi / kBlockN - first + 1 : 0;
      const int64_t tile_end = first + (split + 1) * n_tiles / n_splits;
      for (int64_t tile = first + split * n_tiles / n_splits; tile < tile_end; ++tile) {
        const int64_t n0 = tile * kBlockN, nk = std::min(kBlockN, k_hi + 1 - n0);
        const int64_t packed_nk = std::min(kBlockN, Sk - n0);  // the whole tile, as packed
        const int64_t packed_tile = (b * Hkv + hkv) * n_ktiles + tile;
        const scalar_t* ksrc = kp + b * ksb + n0 * kss + hkv * ksh;
        const scalar_t* vsrc = vp + b * vsb + n0 * vss + hkv * vsh;
        acc_t* s = s_buf.data();

        // S = Q K^T
        const acc_t* vt = nullptr;
        int64_t ldv = 0;
        if constexpr (kReduced) {
          if (use_brgemm) {
            brgemm_packed(rows, nk, D, q_red.data(), Dp, k_packed.const_data_ptr<scalar_t>() + packed_tile * kt_size, D,
                          s, kBlockN, false);
          }
        }
        if (!use_brgemm) {
          int64_t ldk;
          const acc_t* kt = kv_tile(ksrc, kss, nk, D, k_buf.data(), ldk);
          vt = kv_tile(vsrc, vss, nk, D, v_buf.data(), ldv);
          gemm<acc_t>(false, true, rows, nk, D, acc_t(1), q_buf.data(), D, kt, ldk, acc_t(0), s, kBlockN);
        }

        // Online softmax over the visible part of each row; P replaces S.
        for (int64_t r = 0; r < rows; ++r) {
          const KeyRange& kr = ranges[r / G];
          acc_t* srow = s + r * kBlockN;
          const int64_t c0 = std::max<int64_t>(kr.lo - n0, 0);
          const int64_t c1 = std::min<int64_t>(kr.hi - n0, nk - 1);
          if (c0 > c1) {  // this row sees none of these keys
            fill(srow, nk, acc_t(0));
            continue;
          }
          const int64_t nc = c1 - c0 + 1;
          const acc_t m_new = std::max(row_m[r], transform_scores<acc_t>(srow + c0, nullptr, nc, scale, cap));
          const acc_t l_new = exp_shift_sum(srow + c0, nc, m_new);
          fill(srow, c0, acc_t(0));
          fill(srow + c1 + 1, nk - c1 - 1, acc_t(0));
          move_row_max(acc.data() + r * D, D, row_m[r], row_l[r], m_new);
          row_l[r] += l_new;
        }

        // O += P V; the brgemm path rounds P to the input type, as FlashAttention does.
        if constexpr (kReduced) {
          if (use_brgemm) {
            to_padded_rows(s, kBlockN, rows, nk, p_red.data());
            brgemm_packed(rows, D, nk, p_red.data(), round_even(nk),
                          v_packed.const_data_ptr<scalar_t>() + packed_tile * v_size, packed_nk, acc.data(), D, true);
          }
        }
        if (!use_brgemm) {
          gemm<acc_t>(false, false, rows, D, nk, acc_t(1), s, kBlockN, vt, ldv, acc_t(1), acc.data(), D);
        }
      }

      if (n_splits == 1) {
        write_rows(task, acc.data(), row_m.data(), row_l.data());
      } else {
        const int64_t part = work * rows_max;
        std::copy_n(acc.data(), rows * D, part_acc.data() + part * D);
        std::copy_n(row_m.data(), rows, part_m.data() + part);
        std::copy_n(row_l.data(), rows, part_l.data() + part);
      }
    }
    if (use_brgemm) at::native::cpublas::brgemm_release();
  });

  if (n_splits > 1) {
    at::parallel_for(0, n_tasks, 1, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> acc(rows_max * D), row_m(rows_max), row_l(rows_max);
      for (int64_t task = begin; task < end; ++task) {
        const int64_t rows = std::min(Mq, Sq - task % n_qblocks * Mq) * G;
        for (int64_t r = 0; r < rows; ++r) {
          const int64_t part = task * n_splits * rows_max + r;
          merge_splits(n_splits, part_acc.data() + part * D, rows_max * D, part_m.data() + part, part_l.data() + part,
                       rows_max, D, acc.data() + r * D, row_m[r], row_l[r]);
        }
        write_rows(task, acc.data(), row_m.data(), row_l.data());
      }
    });
  }
}

}  // namespace

void attention_fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const AttnParams& p,
                   at::Tensor& out, at::Tensor& lse) {
  if (decode_kernel_serves(q.scalar_type(), q.size(1) * (q.size(2) / k.size(2)))) {
    return CPU_CAPABILITY::attention_fwd_decode(q, k, v, p, SeqLayout{}, q.size(1), out, lse);
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "gqa_attention_fwd_cpu",
                                  [&] { fwd_impl<scalar_t>(q, k, v, p, out, lse); });
}

}  // namespace CPU_CAPABILITY
}  // namespace gqa::cpu
