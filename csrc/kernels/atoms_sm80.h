// The SM80 building blocks the forward and backward kernels share: the
// tensor-core MMA (mma.sync m16n8k16, which Hopper also runs), the swizzled
// shared-memory row atom, and the ldmatrix and store copies around them.
#pragma once

#include <cute/tensor.hpp>
#include <cutlass/numeric_types.h>

#include <cstdint>
#include <type_traits>

namespace gqa::kernels {

template <typename Element>
struct AtomsSm80 {
  static_assert(std::is_same_v<Element, cutlass::half_t> || std::is_same_v<Element, cutlass::bfloat16_t>);
  using MmaAtom = std::conditional_t<std::is_same_v<Element, cutlass::half_t>, cute::SM80_16x8x16_F32F16F16F32_TN,
                                     cute::SM80_16x8x16_F32BF16BF16F32_TN>;
  // Rows of 64 elements (128 bytes) with the 16-byte chunks XOR-swizzled by
  // the row index, so that ldmatrix's 8 rows and cp.async's row writes each
  // hit all 32 banks.
  using SmemLayoutAtom = decltype(cute::composition(
      cute::Swizzle<3, 3, 3>{}, cute::Layout<cute::Shape<cute::_8, cute::_64>, cute::Stride<cute::_64, cute::_1>>{}));
  // Operands whose reduction dim is contiguous in shared memory, and (through
  // transposing ldmatrix) those whose other dim is.
  using SmemCopyAtom = cute::Copy_Atom<cute::SM75_U32x4_LDSM_N, Element>;
  using SmemCopyAtomTransposed = cute::Copy_Atom<cute::SM75_U16x8_LDSM_T, Element>;
  // Accumulator fragments hold column pairs: 4-byte stores into a tile.
  using SmemCopyAtomC = cute::Copy_Atom<cute::UniversalCopy<uint32_t>, Element>;
};

}  // namespace gqa::kernels
