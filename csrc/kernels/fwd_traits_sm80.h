// Compile-time shape of the SM80 forward kernel: tiles, the tiled MMA,
// swizzled shared-memory layouts and the ldmatrix copies that feed the MMA
// (the atoms are AtomsSm80's). A Hopper (wgmma/TMA) path gets traits of its
// own beside these.
#pragma once

#include <cute/tensor.hpp>

#include "kernels/atoms_sm80.h"
#include "kernels/fwd_tiles.h"

namespace gqa::kernels {

template <typename Element_, int kHeadDim_>
struct FwdTraitsSm80 {
  using Element = Element_;
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr FwdTileSm80 kTile = fwd_tile_sm80(kHeadDim);
  static constexpr int kBlockM = kTile.block_m;
  static constexpr int kBlockN = kTile.block_n;
  static constexpr int kNWarps = kTile.warps;
  static constexpr int kNThreads = 32 * kNWarps;
  static_assert(kHeadDim % 64 == 0 && kBlockM % (16 * kNWarps) == 0 && kBlockN % 16 == 0);

  using Atoms = AtomsSm80<Element>;
  using MmaAtom = typename Atoms::MmaAtom;
  // Warps stack along the rows; N is 16 wide so that one ldmatrix.x4 loads a
  // 16x16 piece of B.
  using TiledMma = cute::TiledMMA<cute::MMA_Atom<MmaAtom>, cute::Layout<cute::Shape<cute::Int<kNWarps>, cute::_1, cute::_1>>,
                                  cute::Tile<cute::Int<16 * kNWarps>, cute::_16, cute::_16>>;

  using SmemLayoutAtom = typename Atoms::SmemLayoutAtom;
  using SmemLayoutQ = decltype(cute::tile_to_shape(SmemLayoutAtom{}, cute::Shape<cute::Int<kBlockM>, cute::Int<kHeadDim>>{}));
  using SmemLayoutKV = decltype(cute::tile_to_shape(SmemLayoutAtom{}, cute::Shape<cute::Int<kBlockN>, cute::Int<kHeadDim>>{}));
  // V read as (D, N) for the P @ V product, through transposing ldmatrix.
  using SmemLayoutVt = decltype(cute::composition(
      SmemLayoutKV{}, cute::make_layout(cute::Shape<cute::Int<kHeadDim>, cute::Int<kBlockN>>{}, cute::GenRowMajor{})));
  using SmemLayoutVtNoSwizzle = decltype(cute::get_nonswizzle_portion(SmemLayoutVt{}));

  using SmemCopyAtom = typename Atoms::SmemCopyAtom;
  using SmemCopyAtomTransposed = typename Atoms::SmemCopyAtomTransposed;
  using SmemCopyAtomO = typename Atoms::SmemCopyAtomC;

  static constexpr int kSmemBytes = (kBlockM + 2 * kBlockN) * kHeadDim * int(sizeof(Element));

  // Global <-> shared: each thread moves 16-byte chunks (8 elements) of rows.
  static constexpr int kChunksPerRow = kHeadDim / 8;
  static constexpr int kRowsPerPass = kNThreads / kChunksPerRow;
  static_assert(kNThreads % kChunksPerRow == 0 && kBlockM % kRowsPerPass == 0 && kBlockN % kRowsPerPass == 0);
};

}  // namespace gqa::kernels
