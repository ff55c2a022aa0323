// Building blocks shared by the CPU forward and backward kernels. Included
// only by sources compiled per instruction set, so everything here lives in
// the CPU_CAPABILITY namespace: the same inline function built for AVX512 and
// for DEFAULT must not be merged by the linker.
#pragma once

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/native/CPUBlas.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>

#ifndef CPU_CAPABILITY
#error "tile_ops.h is for the per-instruction-set kernel sources"
#endif

extern "C" {
// Fortran BLAS, exported by torch's CPU library (MKL or OpenBLAS); CMake
// checks for it. Calling it directly skips ATen's per-call dispatch, which
// would cost as much as a small tile GEMM.
void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
            const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
            const float* beta, float* c, const int* ldc);
void dgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
            const double* alpha, const double* a, const int* lda, const double* b, const int* ldb,
            const double* beta, double* c, const int* ldc);
#ifdef GQA_TORCH_HAS_MKL
int MKL_Set_Num_Threads_Local(int nt);  // MKL's C interface
#endif
}

namespace gqa::cpu {
namespace CPU_CAPABILITY {

// Makes BLAS single-threaded on this thread while alive. Torch turns MKL's
// dynamic threading off, so without it every GEMM called from inside an
// at::parallel_for task starts threads of its own, and the oversubscribed
// cores run tens of times slower.
class SequentialBlas {
 public:
#ifdef GQA_TORCH_HAS_MKL
  SequentialBlas() : saved_(MKL_Set_Num_Threads_Local(1)) {}
  ~SequentialBlas() { MKL_Set_Num_Threads_Local(saved_); }

 private:
  int saved_;
#endif
};

// Accumulation type: fp32 for every dtype but float64, which stays float64 so
// that gradcheck sees exact derivatives.
template <typename scalar_t>
using acc_type = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

// Row-major C (m x n, ldc) = alpha * op(A) (m x k) * op(B) (k x n) + beta * C,
// where op(X) is X or, with trans_X, the transpose of the stored matrix.
// BLAS is column-major, so this computes C^T = op(B)^T op(A)^T.
template <typename T>
inline void gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, T alpha,
                 const T* a, int64_t lda, const T* b, int64_t ldb, T beta, T* c, int64_t ldc) {
  if (m == 0 || n == 0) return;
  const char ta = trans_b ? 'T' : 'N';
  const char tb = trans_a ? 'T' : 'N';
  const int M = static_cast<int>(n), N = static_cast<int>(m), K = static_cast<int>(k);
  const int LDA = static_cast<int>(ldb), LDB = static_cast<int>(lda), LDC = static_cast<int>(ldc);
  if (k == 0) {
    // BLAS leaves C alone for k == 0 only when beta == 1; make it explicit.
    for (int64_t i = 0; i < m; ++i)
      for (int64_t j = 0; j < n; ++j) c[i * ldc + j] = beta == T(0) ? T(0) : beta * c[i * ldc + j];
    return;
  }
  if constexpr (std::is_same_v<T, double>) {
    dgemm_(&ta, &tb, &M, &N, &K, &alpha, b, &LDA, a, &LDB, &beta, c, &LDC);
  } else {
    sgemm_(&ta, &tb, &M, &N, &K, &alpha, b, &LDA, a, &LDB, &beta, c, &LDC);
  }
}

// dst[0:n] = src[0:n] * scale, where one side is the input type and the
// other the accumulation type acc_t (the scale's type), or both are acc_t.
template <typename src_t, typename dst_t, typename acc_t>
inline void copy_scaled(const src_t* src, dst_t* dst, int64_t n, acc_t scale) {
  using Vec = at::vec::Vectorized<acc_t>;
  const auto mul = [scale](Vec x) { return x * Vec(scale); };
  if constexpr (std::is_same_v<src_t, dst_t>) {
    at::vec::map(mul, dst, src, n);
  } else if constexpr (std::is_same_v<dst_t, acc_t>) {
    at::vec::convert(src, dst, n);
    if (scale != acc_t(1)) at::vec::map(mul, dst, dst, n);
  } else {
    int64_t i = 0;
    for (; i + Vec::size() <= n; i += Vec::size()) {
      acc_t tmp[Vec::size()];
      mul(Vec::loadu(src + i)).store(tmp);
      at::vec::convert(tmp, dst + i, Vec::size());
    }
    for (; i < n; ++i) dst[i] = static_cast<dst_t>(src[i] * scale);
  }
}

// One pass over a row of raw scores x = q.k: x = scale * x, then with
// cap > 0 x = cap * tanh(x / cap) and, if g is given, g = 1 - tanh^2 (the
// softcap's derivative). Returns the row's max.
template <typename T>
inline T transform_scores(T* x, T* g, int64_t n, T scale, T cap) {
  using Vec = at::vec::Vectorized<T>;
  // Scores are finite, so the max needs no NaN handling (clamp_min is a bare
  // max instruction, at::vec::maximum is not); the common no-softcap case
  // gets its own loop so that the running max stays in a register.
  Vec vmax(-std::numeric_limits<T>::infinity());
  int64_t i = 0;
  if (cap > 0) {
    const T inv_cap = T(1) / cap;
    for (; i + Vec::size() <= n; i += Vec::size()) {
      const Vec t = (Vec::loadu(x + i) * Vec(scale * inv_cap)).tanh();
      const Vec s = t * Vec(cap);
      if (g) (Vec(T(1)) - t * t).store(g + i);
      s.store(x + i);
      vmax = at::vec::clamp_min(s, vmax);
    }
  } else {
    for (; i + Vec::size() <= n; i += Vec::size()) {
      const Vec s = Vec::loadu(x + i) * Vec(scale);
      s.store(x + i);
      vmax = at::vec::clamp_min(s, vmax);
    }
  }
  T m = at::vec::vec_reduce_all<T>([](Vec& a, Vec& b) { return at::vec::clamp_min(a, b); }, vmax);
  for (; i < n; ++i) {
    T s = x[i] * scale;
    if (cap > 0) {
      const T t = std::tanh(s / cap);
      s = cap * t;
      if (g) g[i] = T(1) - t * t;
    }
    x[i] = s;
    m = std::max(m, s);
  }
  return m;
}

// x[0:n] = exp(x[0:n] - shift); returns the sum. exp_u20 is ATen's fast exp
// (about 1e-6 relative error), well inside the fp32 error budget of 1e-5.
template <typename T>
inline T exp_shift_sum(T* x, int64_t n, T shift) {
  using Vec = at::vec::Vectorized<T>;
  Vec vs(T(0));
  int64_t i = 0;
  for (; i + Vec::size() <= n; i += Vec::size()) {
    Vec e = (Vec::loadu(x + i) - Vec(shift)).exp_u20();
    e.store(x + i);
    vs = vs + e;
  }
  T s = at::vec::vec_reduce_all<T>([](Vec& a, Vec& b) { return a + b; }, vs);
  for (; i < n; ++i) {
    x[i] = std::exp(x[i] - shift);
    s += x[i];
  }
  return s;
}

template <typename T>
inline void fill(T* x, int64_t n, T value) {
  for (int64_t i = 0; i < n; ++i) x[i] = value;
}

template <typename T>
inline void scale_inplace(T* x, int64_t n, T s) {
  using Vec = at::vec::Vectorized<T>;
  at::vec::map([s](Vec a) { return a * Vec(s); }, x, x, n);
}

// An online-softmax row's running max moves to m_new (>= m): its sum l and
// its accumulator acc_row[0:D] are rescaled by exp(m - m_new), which is 0 on
// the row's first keys (m = -inf).
template <typename T>
inline void move_row_max(T* acc_row, int64_t D, T& m, T& l, T m_new) {
  if (m == m_new) return;
  const T alpha = std::exp(m - m_new);
  l *= alpha;
  scale_inplace(acc_row, D, alpha);
  m = m_new;
}

// The end of one query row's online softmax: out_row = acc / l, and the
// returned lse = m + log(l). A row that saw no key (l == 0) gets 0 and -inf.
template <typename scalar_t, typename acc_t>
inline float finish_row(const acc_t* acc, acc_t m, acc_t l, int64_t D, scalar_t* out_row) {
  const bool any = l > 0;
  copy_scaled(acc, out_row, D, any ? acc_t(1) / l : acc_t(0));
  return any ? static_cast<float>(m + std::log(l)) : -std::numeric_limits<float>::infinity();
}

// Merges the softmax states of one query row over n disjoint key splits:
// part p has unnormalized output part_acc[p * acc_stride : + D], row max
// part_m[p * ml_stride] and row sum part_l[p * ml_stride]. The splits are
// rescaled to the overall max in split order, so the result does not depend
// on which thread ran which split.
template <typename T>
inline void merge_splits(int64_t n, const T* part_acc, int64_t acc_stride, const T* part_m, const T* part_l,
                         int64_t ml_stride, int64_t D, T* acc, T& m, T& l) {
  m = -std::numeric_limits<T>::infinity();
  l = 0;
  for (int64_t p = 0; p < n; ++p) m = std::max(m, part_m[p * ml_stride]);
  std::fill_n(acc, D, T(0));
  for (int64_t p = 0; p < n; ++p) {
    if (part_l[p * ml_stride] == 0) continue;  // this split saw none of the row's keys
    const T w = std::exp(part_m[p * ml_stride] - m);
    l += part_l[p * ml_stride] * w;
    at::vec::map2([w](auto a, auto x) { return a + x * decltype(x)(w); }, acc, acc, part_acc + p * acc_stride, D);
  }
}

// A K or V tile of `n` rows as a dense acc_t matrix. Float inputs are used in
// place through their row stride; others are converted once into `buf`, and
// that one copy then serves every query head of the group.
template <typename scalar_t, typename acc_t>
inline const acc_t* kv_tile(const scalar_t* src, int64_t row_stride, int64_t n, int64_t D,
                            acc_t* buf, int64_t& ld) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    // BLAS needs ld >= D (a zero or overlapping stride fails that) in 32 bits.
    if (row_stride >= D && row_stride <= std::numeric_limits<int>::max()) {
      ld = row_stride;
      return src;
    }
  }
  for (int64_t r = 0; r < n; ++r) at::vec::convert(src + r * row_stride, buf + r * D, D);
  ld = D;
  return buf;
}

// ---- bfloat16/float16 GEMMs on oneDNN's brgemm (through ATen) ----
// brgemm multiplies A (m x k, row-major) by a B that was packed into its VNNI
// layout: pairs of rows along k interleaved, so k is padded to even with
// zeros, and blocked by kPackN columns (the largest packed ld oneDNN takes).
constexpr int64_t kPackN = 64;

inline int64_t round_even(int64_t n) { return (n + 1) / 2 * 2; }
inline int64_t round_pack(int64_t n) { return (n + kPackN - 1) / kPackN * kPackN; }

// Elements a packed B of (k x n) needs.
inline int64_t packed_size(int64_t k, int64_t n) { return round_even(k) * round_pack(n); }

// dst (n x m, ld_dst) = src (m x n, ld_src)^T, in 32 x 32 blocks.
template <typename T>
inline void transpose(const T* src, int64_t ld_src, int64_t m, int64_t n, T* dst, int64_t ld_dst) {
  for (int64_t i = 0; i < m; i += 32)
    for (int64_t j = 0; j < n; j += 32)
      at::vec::transpose_mxn<T>(src + i * ld_src + j, ld_src, dst + j * ld_dst + i, ld_dst,
                                static_cast<int>(std::min<int64_t>(32, m - i)),
                                static_cast<int>(std::min<int64_t>(32, n - j)));
}

// Packs B = src (k x n, row stride ld_src) for brgemm_packed; `tmp` holds
// round_even(k) * n elements.
template <typename T>
inline void pack_b(const T* src, int64_t ld_src, int64_t k, int64_t n, T* tmp, T* packed) {
  const int64_t kp = round_even(k);
  if (src != tmp)
    for (int64_t r = 0; r < k; ++r) std::copy_n(src + r * ld_src, n, tmp + r * n);
  if (kp != k) std::fill_n(tmp + k * n, n, T(0));
  const auto dt = c10::CppTypeToScalarType<T>::value;
  for (int64_t c = 0; c < n; c += kPackN)
    at::native::cpublas::pack(kp, std::min(kPackN, n - c), n, kPackN, dt, dt, tmp + c, packed + c * kp);
}

// Packs B = src^T, where src is (n x k, row stride ld_src): a K or V tile
// used as K^T / V^T. `tmp` holds round_even(k) * n elements.
template <typename T>
inline void pack_b_transposed(const T* src, int64_t ld_src, int64_t n, int64_t k, T* tmp, T* packed) {
  transpose(src, ld_src, n, k, tmp, n);
  pack_b(tmp, n, k, n, tmp, packed);
}

// c (m x n, ldc) = [c +] a (m x k, lda) * B[:k, :n], with B (packed_k x >= n)
// from pack_b. a's columns from k to round_even(k) must be zero.
template <typename T>
inline void brgemm_packed(int64_t m, int64_t n, int64_t k, const T* a, int64_t lda, const T* packed,
                          int64_t packed_k, float* c, int64_t ldc, bool accumulate) {
  const int64_t kp = round_even(packed_k);
  for (int64_t j = 0; j < n; j += kPackN)
    at::native::cpublas::brgemm(m, std::min(kPackN, n - j), round_even(k), lda, kPackN, ldc, accumulate, a,
                                packed + j * kp, c + j);
}

// dst (m x round_even(n), row-major) = src (m x n, ld_src) in T, zero-padded.
template <typename T>
inline void to_padded_rows(const float* src, int64_t ld_src, int64_t m, int64_t n, T* dst) {
  const int64_t np = round_even(n);
  for (int64_t r = 0; r < m; ++r) {
    at::vec::convert(src + r * ld_src, dst + r * np, n);
    if (np != n) dst[r * np + n] = T(0);
  }
}

}  // namespace CPU_CAPABILITY
}  // namespace gqa::cpu
