// Compile-time shape of the SM80 forward kernel: tiles, the tensor-core MMA
// (mma.sync m16n8k16, which Hopper also runs), swizzled shared-memory
// layouts and the ldmatrix copies that feed the MMA. A Hopper (wgmma/TMA)
// path gets traits of its own beside these.
#pragma once

#include <cute/tensor.hpp>
#include <cutlass/numeric_types.h>

#include <type_traits>

#include "kernels/fwd_tiles.h"

namespace gqa::kernels {

template <typename Element_, int kHeadDim_>
struct FwdTraitsSm80 {
  using Element = Element_;
  static_assert(std::is_same_v<Element, cutlass::half_t> || std::is_same_v<Element, cutlass::bfloat16_t>);
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr FwdTileSm80 kTile = fwd_tile_sm80(kHeadDim);
  static constexpr int kBlockM = kTile.block_m;
  static constexpr int kBlockN = kTile.block_n;
  static constexpr int kNWarps = kTile.warps;
  static constexpr int kNThreads = 32 * kNWarps;
  static_assert(kHeadDim % 64 == 0 && kBlockM % (16 * kNWarps) == 0 && kBlockN % 16 == 0);

  using MmaAtom = std::conditional_t<std::is_same_v<Element, cutlass::half_t>, cute::SM80_16x8x16_F32F16F16F32_TN,
                                     cute::SM80_16x8x16_F32BF16BF16F32_TN>;
  // Warps stack along the rows; N is 16 wide so that one ldmatrix.x4 loads a
  // 16x16 piece of B.
  using TiledMma = cute::TiledMMA<cute::MMA_Atom<MmaAtom>, cute::Layout<cute::Shape<cute::Int<kNWarps>, cute::_1, cute::_1>>,
                                  cute::Tile<cute::Int<16 * kNWarps>, cute::_16, cute::_16>>;

  // Rows of 64 elements (128 bytes) with the 16-byte chunks XOR-swizzled by
  // the row index, so that ldmatrix's 8 rows and cp.async's row writes each
  // hit all 32 banks.
  using SmemLayoutAtom = decltype(cute::composition(
      cute::Swizzle<3, 3, 3>{}, cute::Layout<cute::Shape<cute::_8, cute::_64>, cute::Stride<cute::_64, cute::_1>>{}));
  using SmemLayoutQ = decltype(cute::tile_to_shape(SmemLayoutAtom{}, cute::Shape<cute::Int<kBlockM>, cute::Int<kHeadDim>>{}));
  using SmemLayoutKV = decltype(cute::tile_to_shape(SmemLayoutAtom{}, cute::Shape<cute::Int<kBlockN>, cute::Int<kHeadDim>>{}));
  // V read as (D, N) for the P @ V product, through transposing ldmatrix.
  using SmemLayoutVt = decltype(cute::composition(
      SmemLayoutKV{}, cute::make_layout(cute::Shape<cute::Int<kHeadDim>, cute::Int<kBlockN>>{}, cute::GenRowMajor{})));
  using SmemLayoutVtNoSwizzle = decltype(cute::get_nonswizzle_portion(SmemLayoutVt{}));

  using SmemCopyAtom = cute::Copy_Atom<cute::SM75_U32x4_LDSM_N, Element>;
  using SmemCopyAtomTransposed = cute::Copy_Atom<cute::SM75_U16x8_LDSM_T, Element>;
  // Accumulator fragments hold column pairs: 4-byte stores into the O tile.
  using SmemCopyAtomO = cute::Copy_Atom<cute::UniversalCopy<uint32_t>, Element>;

  static constexpr int kSmemBytes = (kBlockM + 2 * kBlockN) * kHeadDim * int(sizeof(Element));

  // Global <-> shared: each thread moves 16-byte chunks (8 elements) of rows.
  static constexpr int kChunksPerRow = kHeadDim / 8;
  static constexpr int kRowsPerPass = kNThreads / kChunksPerRow;
  static_assert(kNThreads % kChunksPerRow == 0 && kBlockM % kRowsPerPass == 0 && kBlockN % kRowsPerPass == 0);
};

}  // namespace gqa::kernels
