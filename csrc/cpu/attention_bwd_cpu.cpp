// CPU backward, FlashAttention-2 style: probabilities are recomputed from the
// forward's lse and never stored. One task owns (batch, KV head, chunk of key
// tiles); for each key tile it walks every query head of the group and every
// query block that sees those keys, so dK and dV are summed over the group in
// fp32 inside the task and written once: no G-times expanded buffer, no race.
//
// dQ gets contributions from every key chunk. Each chunk accumulates into its
// own fp32 slice, and the slices are summed in chunk order at the end, so the
// result is bitwise repeatable for a given thread count whether or not
// `deterministic` is asked for. One chunk per (batch, KV head) unless that
// leaves threads idle, so the extra memory is usually one fp32 copy of dQ.
#include "cpu/attention_cpu.h"
#include "cpu/tile_ops.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>

#include <vector>

namespace gqa::cpu {
namespace CPU_CAPABILITY {
namespace {

constexpr int64_t kRows = 128;
constexpr int64_t kBlockN = 128;

template <typename scalar_t>
void bwd_impl(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
              const at::Tensor& out, const at::Tensor& lse, const AttnParams& p, at::Tensor& dq,
              at::Tensor& dk, at::Tensor& dv) {
  using acc_t = acc_type<scalar_t>;
  constexpr bool kReduced = !std::is_same_v<scalar_t, acc_t>;
  const int64_t B = q.size(0), Sq = q.size(1), Hq = q.size(2), D = q.size(3);
  const int64_t Sk = k.size(1), Hkv = k.size(2), G = Hq / Hkv;
  const scalar_t* qp = q.const_data_ptr<scalar_t>();
  const scalar_t* kp = k.const_data_ptr<scalar_t>();
  const scalar_t* vp = v.const_data_ptr<scalar_t>();
  const scalar_t* dop = dout.const_data_ptr<scalar_t>();
  const scalar_t* outp = out.const_data_ptr<scalar_t>();
  const float* lsep = lse.const_data_ptr<float>();
  scalar_t* dqp = dq.data_ptr<scalar_t>();
  scalar_t* dkp = dk.data_ptr<scalar_t>();
  scalar_t* dvp = dv.data_ptr<scalar_t>();
  const acc_t scale = static_cast<acc_t>(p.softmax_scale);
  const acc_t cap = static_cast<acc_t>(p.softcap);
  // lse's strides are taken as given (the forward writes it contiguous).
  const int64_t lsb = lse.stride(0), lsh = lse.stride(1), lss = lse.stride(2);

  // delta = rowsum(dO * O), the softmax-gradient correction per query row.
  std::vector<acc_t> delta(B * Hq * Sq);
  at::parallel_for(0, B * Sq, 16, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> a(D), c(D);
    for (int64_t bs = begin; bs < end; ++bs) {
      const int64_t b = bs / Sq, i = bs % Sq;
      for (int64_t h = 0; h < Hq; ++h) {
        copy_scaled(dop + b * dout.stride(0) + i * dout.stride(1) + h * dout.stride(2), a.data(), D, acc_t(1));
        copy_scaled(outp + b * out.stride(0) + i * out.stride(1) + h * out.stride(2), c.data(), D, acc_t(1));
        acc_t s = 0;
        for (int64_t d = 0; d < D; ++d) s += a[d] * c[d];
        delta[(b * Hq + h) * Sq + i] = s;
      }
    }
  });

  const int64_t Mq = std::max<int64_t>(1, kRows / G);
  const int64_t rows_max = Mq * G;
  const int64_t n_ktiles = (Sk + kBlockN - 1) / kBlockN;
  const int64_t bh = B * Hkv;
  const int64_t n_chunks =
      std::clamp<int64_t>((at::get_num_threads() + bh - 1) / std::max<int64_t>(bh, 1), 1, std::max<int64_t>(n_ktiles, 1));
  // (chunk, B, Hkv, Sq, G, D): a task's rows for one query block are contiguous.
  at::Tensor dq_acc = at::empty({n_chunks, B, Hkv, Sq, G, D}, q.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
  acc_t* dq_accp = dq_acc.data_ptr<acc_t>();
  const int64_t slice = Sq * G * D;

  // bfloat16/float16: GEMMs on brgemm where ATen can pack for it (see
  // attention_fwd_cpu.cpp), with P and dS rounded to the input type as
  // FlashAttention does; otherwise everything in fp32 through BLAS.
  bool use_brgemm = false;
  if constexpr (kReduced) use_brgemm = at::native::cpublas::could_pack(q.scalar_type()) && Sq * G >= 64;
  const int64_t Dp = round_even(D), rows_p = round_even(rows_max), nk_p = round_even(kBlockN);

  at::parallel_for(0, n_chunks * bh, 1, [&](int64_t begin, int64_t end) {
    SequentialBlas sequential_blas;
    std::vector<acc_t> p_buf(rows_max * kBlockN), ds_buf(rows_max * kBlockN), g_buf(cap > 0 ? rows_max * kBlockN : 0);
    std::vector<acc_t> dk_acc(kBlockN * D), dv_acc(kBlockN * D), row_lse(rows_max), row_delta(rows_max);
    std::vector<KeyRange> ranges(Mq);
    // fp32 BLAS path
    std::vector<acc_t> k_buf, v_buf, q_buf, do_buf;
    // brgemm path: operands in the input type; B operands packed.
    std::vector<scalar_t> q_red, do_red, p_red, pt_red, tmp, kt_pack, vt_pack, k_pack, q_pack, do_pack;
    if (use_brgemm) {
      q_red.assign(rows_p * Dp, scalar_t(0));  // the pad column stays zero; pad rows are cleared when used
      do_red.assign(rows_p * Dp, scalar_t(0));
      p_red.resize(rows_p * nk_p);
      pt_red.resize(kBlockN * rows_p);
      tmp.resize(std::max({Dp * kBlockN, nk_p * D, rows_p * D}));
      kt_pack.resize(packed_size(D, kBlockN));
      vt_pack.resize(packed_size(D, kBlockN));
      k_pack.resize(packed_size(kBlockN, D));
      q_pack.resize(packed_size(rows_max, D));
      do_pack.resize(packed_size(rows_max, D));
    } else {
      k_buf.resize(kBlockN * D);
      v_buf.resize(kBlockN * D);
      q_buf.resize(rows_max * D);
      do_buf.resize(rows_max * D);
    }

    for (int64_t task = begin; task < end; ++task) {
      const int64_t chunk = task / bh, hkv = task % Hkv, b = (task / Hkv) % B;
      acc_t* dq_slice = dq_accp + (chunk * bh + b * Hkv + hkv) * slice;
      fill(dq_slice, slice, acc_t(0));
      const int64_t t_begin = chunk * n_ktiles / n_chunks, t_end = (chunk + 1) * n_ktiles / n_chunks;

      for (int64_t t = t_begin; t < t_end; ++t) {
        const int64_t n0 = t * kBlockN, nk = std::min(kBlockN, Sk - n0);
        const scalar_t* ksrc = kp + b * k.stride(0) + n0 * k.stride(1) + hkv * k.stride(2);
        const scalar_t* vsrc = vp + b * v.stride(0) + n0 * v.stride(1) + hkv * v.stride(2);
        const acc_t* kt = nullptr;
        const acc_t* vt = nullptr;
        int64_t ldk = 0, ldv = 0;
        if (use_brgemm) {
          pack_b_transposed(ksrc, k.stride(1), nk, D, tmp.data(), kt_pack.data());  // for S = Q K^T
          pack_b_transposed(vsrc, v.stride(1), nk, D, tmp.data(), vt_pack.data());  // for dP = dO V^T
          pack_b(ksrc, k.stride(1), nk, D, tmp.data(), k_pack.data());              // for dQ = dS K
        } else {
          kt = kv_tile(ksrc, k.stride(1), nk, D, k_buf.data(), ldk);
          vt = kv_tile(vsrc, v.stride(1), nk, D, v_buf.data(), ldv);
        }
        fill(dk_acc.data(), nk * D, acc_t(0));
        fill(dv_acc.data(), nk * D, acc_t(0));

        // Queries that see any key of [n0, n0 + nk): the inverse of visible_keys.
        const int64_t shift = Sk - Sq;
        const int64_t i_lo = p.window_right >= 0 ? std::max<int64_t>(0, n0 - shift - p.window_right) : 0;
        const int64_t i_hi =
            p.window_left >= 0 ? std::min<int64_t>(Sq - 1, n0 + nk - 1 - shift + p.window_left) : Sq - 1;

        for (int64_t m0 = i_lo; m0 <= i_hi; m0 += Mq) {
          const int64_t mq = std::min(Mq, i_hi + 1 - m0), rows = mq * G;
          for (int64_t i = 0; i < mq; ++i) {
            ranges[i] = visible_keys(m0 + i, Sq, Sk, p);
            for (int64_t g = 0; g < G; ++g) {
              const int64_t h = hkv * G + g, r = i * G + g;
              const scalar_t* qsrc = qp + b * q.stride(0) + (m0 + i) * q.stride(1) + h * q.stride(2);
              const scalar_t* dosrc = dop + b * dout.stride(0) + (m0 + i) * dout.stride(1) + h * dout.stride(2);
              if (use_brgemm) {
                std::copy_n(qsrc, D, q_red.data() + r * Dp);
                std::copy_n(dosrc, D, do_red.data() + r * Dp);
              } else {
                copy_scaled(qsrc, q_buf.data() + r * D, D, acc_t(1));
                copy_scaled(dosrc, do_buf.data() + r * D, D, acc_t(1));
              }
              row_lse[r] = lsep[b * lsb + h * lsh + (m0 + i) * lss];
              row_delta[r] = delta[(b * Hq + h) * Sq + m0 + i];
            }
          }
          if (use_brgemm && rows % 2 == 1) {  // brgemm reduces over rows below: zero the pad row
            std::fill_n(q_red.data() + rows * Dp, Dp, scalar_t(0));
            std::fill_n(do_red.data() + rows * Dp, Dp, scalar_t(0));
          }

          // S = Q K^T and dP = dO V^T
          acc_t* pm = p_buf.data();
          acc_t* ds = ds_buf.data();
          if constexpr (kReduced) {
            if (use_brgemm) {
              brgemm_packed(rows, nk, D, q_red.data(), Dp, kt_pack.data(), D, pm, kBlockN, false);
              brgemm_packed(rows, nk, D, do_red.data(), Dp, vt_pack.data(), D, ds, kBlockN, false);
            }
          }
          if (!use_brgemm) {
            gemm<acc_t>(false, true, rows, nk, D, acc_t(1), q_buf.data(), D, kt, ldk, acc_t(0), pm, kBlockN);
            gemm<acc_t>(false, true, rows, nk, D, acc_t(1), do_buf.data(), D, vt, ldv, acc_t(0), ds, kBlockN);
          }

          // P = exp(softcap(scale * S) - lse), zero where masked;
          // dS = scale * P * (dP - delta) * softcap'(.)
          using Vec = at::vec::Vectorized<acc_t>;
          for (int64_t r = 0; r < rows; ++r) {
            const KeyRange& kr = ranges[r / G];
            acc_t* prow = pm + r * kBlockN;
            acc_t* dsrow = ds + r * kBlockN;
            const int64_t c0 = std::max<int64_t>(kr.lo - n0, 0), c1 = std::min<int64_t>(kr.hi - n0, nk - 1);
            if (c0 > c1 || row_lse[r] == -std::numeric_limits<acc_t>::infinity()) {
              fill(prow, nk, acc_t(0));
              fill(dsrow, nk, acc_t(0));
              continue;
            }
            const int64_t nc = c1 - c0 + 1;
            acc_t* grow = cap > 0 ? g_buf.data() + r * kBlockN : nullptr;
            transform_scores<acc_t>(prow + c0, cap > 0 ? grow + c0 : nullptr, nc, scale, cap);
            exp_shift_sum(prow + c0, nc, row_lse[r]);
            fill(prow, c0, acc_t(0));
            fill(prow + c1 + 1, nk - c1 - 1, acc_t(0));
            const acc_t dl = row_delta[r];
            if (cap > 0) {
              at::vec::map3([dl, scale](Vec d, Vec pp, Vec gg) { return pp * (d - Vec(dl)) * gg * Vec(scale); },
                            dsrow, dsrow, prow, grow, nk);
            } else {
              at::vec::map2([dl, scale](Vec d, Vec pp) { return pp * (d - Vec(dl)) * Vec(scale); }, dsrow, dsrow,
                            prow, nk);
            }
          }

          // dV += P^T dO, dK += dS^T Q, dQ += dS K
          if constexpr (kReduced) {
            if (use_brgemm) {
              const int64_t rp = round_even(rows);
              pack_b(do_red.data(), Dp, rows, D, tmp.data(), do_pack.data());
              pack_b(q_red.data(), Dp, rows, D, tmp.data(), q_pack.data());
              for (auto [src, packed, acc] : {std::tuple{pm, do_pack.data(), dv_acc.data()},
                                              std::tuple{ds, q_pack.data(), dk_acc.data()}}) {
                to_padded_rows(src, kBlockN, rows, nk, p_red.data());
                if (rp != rows) std::fill_n(p_red.data() + rows * round_even(nk), round_even(nk), scalar_t(0));
                transpose(p_red.data(), round_even(nk), rp, nk, pt_red.data(), rp);
                brgemm_packed(nk, D, rows, pt_red.data(), rp, packed, rows, acc, D, true);
              }
              // p_red holds dS from the loop's last pass.
              brgemm_packed(rows, D, nk, p_red.data(), round_even(nk), k_pack.data(), nk, dq_slice + m0 * G * D, D,
                            true);
            }
          }
          if (!use_brgemm) {
            gemm<acc_t>(true, false, nk, D, rows, acc_t(1), pm, kBlockN, do_buf.data(), D, acc_t(1), dv_acc.data(),
                        D);
            gemm<acc_t>(true, false, nk, D, rows, acc_t(1), ds, kBlockN, q_buf.data(), D, acc_t(1), dk_acc.data(),
                        D);
            gemm<acc_t>(false, false, rows, D, nk, acc_t(1), ds, kBlockN, kt, ldk, acc_t(1), dq_slice + m0 * G * D,
                        D);
          }
        }

        for (int64_t j = 0; j < nk; ++j) {
          const int64_t o = ((b * Sk + n0 + j) * Hkv + hkv) * D;
          copy_scaled(dk_acc.data() + j * D, dkp + o, D, acc_t(1));
          copy_scaled(dv_acc.data() + j * D, dvp + o, D, acc_t(1));
        }
      }
    }
    if (use_brgemm) at::native::cpublas::brgemm_release();
  });

  // dQ = sum over chunks, in chunk order (dS already carries the scale).
  at::parallel_for(0, B * Sq, 16, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> sum(D);
    for (int64_t bs = begin; bs < end; ++bs) {
      const int64_t b = bs / Sq, i = bs % Sq;
      for (int64_t h = 0; h < Hq; ++h) {
        const int64_t hkv = h / G, g = h % G;
        const int64_t off = ((b * Hkv + hkv) * Sq + i) * G * D + g * D;
        std::copy_n(dq_accp + off, D, sum.data());
        for (int64_t c = 1; c < n_chunks; ++c) {
          const acc_t* part = dq_accp + c * bh * slice + off;
          for (int64_t d = 0; d < D; ++d) sum[d] += part[d];
        }
        copy_scaled(sum.data(), dqp + ((b * Sq + i) * Hq + h) * D, D, acc_t(1));
      }
    }
  });
}

}  // namespace

void attention_bwd(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                   const at::Tensor& out, const at::Tensor& lse, const AttnParams& p, at::Tensor& dq, at::Tensor& dk,
                   at::Tensor& dv) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "gqa_attention_bwd_cpu",
                                  [&] { bwd_impl<scalar_t>(dout, q, k, v, out, lse, p, dq, dk, dv); });
}

}  // namespace CPU_CAPABILITY
}  // namespace gqa::cpu
