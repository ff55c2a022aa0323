// Device helpers shared by the SM80 attention kernels.
#pragma once

#include <cute/tensor.hpp>
#include <cutlass/array.h>
#include <cutlass/numeric_conversion.h>

#include <cstdint>

namespace gqa::kernels::sm80 {

// 16 bytes global -> shared, asynchronously (cp.async, bypassing L1). When
// `valid` is false nothing is read and the destination is zero-filled, which
// is how tiles get their padding rows and columns.
__device__ __forceinline__ void cp_async_16(void* smem, const void* gmem, bool valid) {
  const uint32_t dst = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(gmem), "r"(valid ? 16 : 0));
}

__device__ __forceinline__ float fast_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

// tanh from one exp2 and one fast division: absolute error about 1e-7 over
// the whole range, which is what matters for a score (it feeds an exp), and
// branch-free, unlike tanhf, whose temporaries across an unrolled tile cost
// the registers that the accumulators need.
__device__ __forceinline__ float fast_tanh(float x) {
  return 1.f - __fdividef(2.f, 1.f + fast_exp2(x * 2.8853900817779268f));  // 2 * log2(e)
}

// x, through a move the compiler cannot see into. Index math written the
// same way before and after the key loop is otherwise computed once and kept
// live (spilled) across the loop; with an opaque input it is recomputed.
__device__ __forceinline__ int opaque(int x) {
  int y;
  asm volatile("mov.b32 %0, %1;" : "=r"(y) : "r"(x));
  return y;
}

// Reductions over the 4 threads of a quad, which together hold one row of
// an m16n8 accumulator.
__device__ __forceinline__ float quad_max(float x) {
  x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
  return fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
}

__device__ __forceinline__ float quad_sum(float x) {
  x += __shfl_xor_sync(0xffffffffu, x, 2);
  return x + __shfl_xor_sync(0xffffffffu, x, 1);
}

// An m16n8 accumulator fragment ((2 cols, 2 row halves), MMA_M, MMA_N) seen
// as (rows (2, MMA_M), cols (2, MMA_N)), so that softmax code can walk rows.
template <class Layout>
__device__ __forceinline__ constexpr auto acc_rowcol(Layout l) {
  using namespace cute;
  static_assert(decltype(size<0>(l))::value == 4 && decltype(rank(l))::value == 3);
  auto d = logical_divide(l, Shape<_2>{});
  return make_layout(make_layout(get<0, 1>(d), get<1>(d)), make_layout(get<0, 0>(d), get<2>(d)));
}

// The same fragment as the A operand of the next m16n8k16 MMA: two adjacent
// n8 accumulators hold exactly the registers of one k16 A fragment.
template <class Layout>
__device__ __forceinline__ constexpr auto acc_as_a_operand(Layout l) {
  using namespace cute;
  static_assert(decltype(size<0>(l))::value == 4 && decltype(rank(l))::value == 3);
  static_assert(decltype(size<2>(l))::value % 2 == 0);
  auto d = logical_divide(l, Shape<X, X, _2>{});  // (4, MMA_M, (2, MMA_N / 2))
  return make_layout(make_layout(get<0>(d), get<2, 0>(d)), get<1>(d), get<2, 1>(d));
}

// Element-wise conversion of a register fragment into a new one (packed
// conversions, e.g. cvt.rn.bf16x2.f32).
template <typename To, class Engine, class Layout>
__device__ __forceinline__ auto convert_fragment(cute::Tensor<Engine, Layout> const& t) {
  using From = typename Engine::value_type;
  constexpr int N = decltype(cute::size(t))::value;
  auto out = cute::make_tensor<To>(t.layout());
  cutlass::NumericArrayConverter<To, From, N> conv;
  *reinterpret_cast<cutlass::Array<To, N>*>(out.data()) =
      conv(*reinterpret_cast<cutlass::Array<From, N> const*>(t.data()));
  return out;
}

// Row fragment m of this warp computes; with a single fragment the caller's
// m_active > 0 check already decided, so no predicate is left in the code.
template <int kFragments>
__device__ __forceinline__ bool row_fragment_active(int m, int m_active) {
  return kFragments == 1 || m < m_active;
}

// acc += A(:, :, k) @ B(:, :, k)^T for the active row fragments, operands
// already in registers.
template <class TiledMma, class TA, class TB, class TC>
__device__ __forceinline__ void mma_k_slice(TC& acc, TA const& rA, TB const& rB, int k, TiledMma const& mma,
                                            int m_active) {
  using namespace cute;
  CUTE_UNROLL
  for (int m = 0; m < size<1>(rA); ++m) {
    if (row_fragment_active<decltype(size<1>(rA))::value>(m, m_active)) {
      CUTE_UNROLL
      for (int n = 0; n < size<1>(rB); ++n) cute::gemm(mma, rA(_, m, k), rB(_, n, k), acc(_, m, n));
    }
  }
}

// acc += A @ B^T with both operands in shared memory, loaded k-slice by
// k-slice into registers through ldmatrix. Only the first `m_active` row
// fragments of this warp compute: row fragments that are all padding (decode
// tiles hold a handful of real rows) cost neither ldmatrix nor MMA.
template <class TiledMma, class TA, class TB, class TC, class TsA, class TsB, class CopyA, class CopyB, class ThrCopyA,
          class ThrCopyB>
__device__ __forceinline__ void gemm_smem_smem(TC& acc, TA& rA, TB& rB, TsA const& sA, TsB const& sB,
                                               TiledMma const& mma, CopyA const& copy_a, CopyB const& copy_b,
                                               ThrCopyA const& thr_copy_a, ThrCopyB const& thr_copy_b,
                                               int m_active) {
  using namespace cute;
  if (m_active == 0) return;
  Tensor rA_view = thr_copy_a.retile_D(rA);
  Tensor rB_view = thr_copy_b.retile_D(rB);
  static_assert(decltype(size<1>(sA))::value == decltype(size<1>(rA_view))::value);
  static_assert(decltype(size<1>(sB))::value == decltype(size<1>(rB_view))::value);
  CUTE_UNROLL
  for (int k = 0; k < size<2>(rA); ++k) {
    CUTE_UNROLL
    for (int m = 0; m < size<1>(rA); ++m) {
      if (row_fragment_active<decltype(size<1>(rA))::value>(m, m_active)) {
        copy(copy_a, sA(_, m, k), rA_view(_, m, k));
      }
    }
    copy(copy_b, sB(_, _, k), rB_view(_, _, k));
    mma_k_slice(acc, rA, rB, k, mma, m_active);
  }
}

// acc += A @ B^T with A already in registers (the probabilities) and B in
// shared memory; m_active as above.
template <class TiledMma, class TA, class TB, class TC, class TsB, class CopyB, class ThrCopyB>
__device__ __forceinline__ void gemm_reg_smem(TC& acc, TA const& rA, TB& rB, TsB const& sB, TiledMma const& mma,
                                              CopyB const& copy_b, ThrCopyB const& thr_copy_b, int m_active) {
  using namespace cute;
  if (m_active == 0) return;
  Tensor rB_view = thr_copy_b.retile_D(rB);
  CUTE_UNROLL
  for (int k = 0; k < size<2>(rA); ++k) {
    copy(copy_b, sB(_, _, k), rB_view(_, _, k));
    mma_k_slice(acc, rA, rB, k, mma, m_active);
  }
}

}  // namespace gqa::kernels::sm80
