// CPU forward: tiled attention with an online softmax, never materializing
// an Sq x Sk matrix. One task owns (batch, KV head, block of query positions)
// and packs the G query heads of the group into the rows of its tile, so each
// K/V tile is read (and converted to fp32) once and used by the whole group.
#include "cpu/attention_cpu.h"
#include "cpu/tile_ops.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <vector>

namespace gqa::cpu {
namespace CPU_CAPABILITY {
namespace {

// Rows of a tile: (query position, head of the group) pairs, ~kRows of them.
// kBlockN keys per K/V tile. Chosen so that the Q, K, V, score and output
// tiles (~1 MB for D = 128) stay in a core's L2.
constexpr int64_t kRows = 256;
constexpr int64_t kBlockN = 512;

template <typename scalar_t>
void fwd_impl(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const AttnParams& p,
              at::Tensor& out, at::Tensor& lse) {
  using acc_t = acc_type<scalar_t>;
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

  at::parallel_for(0, n_tasks, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> q_buf(rows_max * D), k_buf(kBlockN * D), v_buf(kBlockN * D);
    std::vector<acc_t> s_buf(rows_max * kBlockN), acc(rows_max * D), row_m(rows_max), row_l(rows_max);
    std::vector<KeyRange> ranges(Mq);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t qb = task % n_qblocks;
      const int64_t hkv = (task / n_qblocks) % Hkv;
      const int64_t b = task / (n_qblocks * Hkv);
      const int64_t m0 = qb * Mq, mq = std::min(Mq, Sq - m0), rows = mq * G;

      // Rows are ordered (position, head): for one position the group's heads
      // are adjacent in memory, and the output rows come out in that order.
      for (int64_t i = 0; i < mq; ++i) {
        ranges[i] = visible_keys(m0 + i, Sq, Sk, p);
        for (int64_t g = 0; g < G; ++g)
          load_scaled(qp + b * qsb + (m0 + i) * qss + (hkv * G + g) * qsh, q_buf.data() + (i * G + g) * D, D,
                      scale);
      }
      fill(row_m.data(), rows, neg_inf);
      fill(row_l.data(), rows, acc_t(0));
      fill(acc.data(), rows * D, acc_t(0));

      // The windows only move forward with the query position.
      const int64_t k_lo = ranges[0].lo, k_hi = ranges[mq - 1].hi;
      for (int64_t n0 = k_lo; n0 <= k_hi; n0 += kBlockN) {
        const int64_t nk = std::min(kBlockN, k_hi + 1 - n0);
        int64_t ldk, ldv;
        const acc_t* kt = kv_tile(kp + b * ksb + n0 * kss + hkv * ksh, kss, nk, D, k_buf.data(), ldk);
        const acc_t* vt = kv_tile(vp + b * vsb + n0 * vss + hkv * vsh, vss, nk, D, v_buf.data(), ldv);
        acc_t* s = s_buf.data();
        gemm<acc_t>(false, true, rows, nk, D, acc_t(1), q_buf.data(), D, kt, ldk, acc_t(0), s, kBlockN);

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
          if (cap > 0) apply_softcap<acc_t>(srow + c0, nullptr, nc, cap);
          const acc_t m_new = std::max(row_m[r], row_max(srow + c0, nc));
          const acc_t l_new = exp_shift_sum(srow + c0, nc, m_new);
          fill(srow, c0, acc_t(0));
          fill(srow + c1 + 1, nk - c1 - 1, acc_t(0));
          if (row_m[r] != m_new) {
            const acc_t alpha = std::exp(row_m[r] - m_new);  // 0 on the first visible tile
            row_l[r] *= alpha;
            scale_inplace(acc.data() + r * D, D, alpha);
            row_m[r] = m_new;
          }
          row_l[r] += l_new;
        }
        gemm<acc_t>(false, false, rows, D, nk, acc_t(1), s, kBlockN, vt, ldv, acc_t(1), acc.data(), D);
      }

      for (int64_t r = 0; r < rows; ++r) {
        const int64_t i = m0 + r / G, h = hkv * G + r % G;
        const bool any = row_l[r] > 0;
        store_scaled(acc.data() + r * D, op + ((b * Sq + i) * Hq + h) * D, D,
                     any ? acc_t(1) / row_l[r] : acc_t(0));
        lsep[(b * Hq + h) * Sq + i] =
            any ? static_cast<float>(row_m[r] + std::log(row_l[r])) : -std::numeric_limits<float>::infinity();
      }
    }
  });
}

}  // namespace

void attention_fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const AttnParams& p,
                   at::Tensor& out, at::Tensor& lse) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "gqa_attention_fwd_cpu",
                                  [&] { fwd_impl<scalar_t>(q, k, v, p, out, lse); });
}

}  // namespace CPU_CAPABILITY
}  // namespace gqa::cpu
