// Compile-time shape of the SM80 backward kernel: tiles, the three tiled
// MMAs (one per output shape) and the shared-memory layouts, with the
// transposed views that let one tile in shared memory serve as an operand
// of either orientation.
#pragma once

#include <cute/tensor.hpp>

#include "kernels/atoms_sm80.h"
#include "kernels/bwd_tiles.h"

namespace gqa::kernels {

template <typename Element_, int kHeadDim_>
struct BwdTraitsSm80 {
  using Element = Element_;
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr BwdTileSm80 kTile = bwd_tile_sm80(kHeadDim);
  static constexpr int kBlockM = kTile.block_m;
  static constexpr int kBlockN = kTile.block_n;
  static constexpr int kNWarps = kTile.warps;
  static constexpr int kNThreads = 32 * kNWarps;

  using Atoms = AtomsSm80<Element>;
  // kRows x kCols warps, each atom 16 x 16 (two n8 atoms side by side, so
  // that one ldmatrix.x4 loads a 16 x 16 piece of B).
  template <int kRows, int kCols>
  using Mma = cute::TiledMMA<cute::MMA_Atom<typename Atoms::MmaAtom>,
                             cute::Layout<cute::Shape<cute::Int<kRows>, cute::Int<kCols>, cute::_1>>,
                             cute::Tile<cute::Int<16 * kRows>, cute::Int<16 * kCols>, cute::_16>>;
  // S = Q K^T and dP = dO V^T: (block_m, block_n).
  using TiledMmaSdP = Mma<kTile.atom_m_sdp, kNWarps / kTile.atom_m_sdp>;
  // dV += P^T dO and dK += dS^T Q: (block_n, head dim).
  using TiledMmadKV = Mma<kTile.atom_n_dkv, kNWarps / kTile.atom_n_dkv>;
  // dQ = dS K: (block_m, head dim).
  using TiledMmadQ = Mma<kTile.atom_m_dq, kNWarps / kTile.atom_m_dq>;
  static_assert(kBlockM % (16 * kTile.atom_m_sdp) == 0 && kBlockN % (16 * kNWarps / kTile.atom_m_sdp) == 0);
  static_assert(kBlockN % (16 * kTile.atom_n_dkv) == 0 && kHeadDim % (16 * kNWarps / kTile.atom_n_dkv) == 0);
  static_assert(kBlockM % (16 * kTile.atom_m_dq) == 0 && kHeadDim % (16 * kNWarps / kTile.atom_m_dq) == 0);

  using SmemLayoutAtom = typename Atoms::SmemLayoutAtom;
  template <int kRows, int kCols>
  using SmemTile = decltype(cute::tile_to_shape(SmemLayoutAtom{}, cute::Shape<cute::Int<kRows>, cute::Int<kCols>>{}));
  // The (kCols, kRows) transpose of a (kRows, kCols) tile, for operands
  // read through transposing ldmatrix; register fragments are shaped from
  // its unswizzled part.
  template <class Tile, int kRows, int kCols>
  using Transposed = decltype(cute::composition(
      Tile{}, cute::make_layout(cute::Shape<cute::Int<kCols>, cute::Int<kRows>>{}, cute::GenRowMajor{})));

  using SmemLayoutQdO = SmemTile<kBlockM, kHeadDim>;  // Q and dO, rows of one head
  using SmemLayoutKV = SmemTile<kBlockN, kHeadDim>;   // K and V; dK and dV at the end
  using SmemLayoutPdS = SmemTile<kBlockM, kBlockN>;   // P and dS, in Element
  using SmemLayoutQdOt = Transposed<SmemLayoutQdO, kBlockM, kHeadDim>;
  using SmemLayoutKt = Transposed<SmemLayoutKV, kBlockN, kHeadDim>;
  using SmemLayoutPdSt = Transposed<SmemLayoutPdS, kBlockM, kBlockN>;
  using SmemLayoutQdOtNoSwizzle = decltype(cute::get_nonswizzle_portion(SmemLayoutQdOt{}));
  using SmemLayoutKtNoSwizzle = decltype(cute::get_nonswizzle_portion(SmemLayoutKt{}));
  using SmemLayoutPdStNoSwizzle = decltype(cute::get_nonswizzle_portion(SmemLayoutPdSt{}));

  static constexpr int kSmemBytes = (2 * kBlockM * kHeadDim + 2 * kBlockN * kHeadDim + 2 * kBlockM * kBlockN) *
                                    int(sizeof(Element));

  // Global <-> shared: each thread moves 16-byte chunks (8 elements) of rows.
  static constexpr int kChunksPerRow = kHeadDim / 8;
  static constexpr int kRowsPerPass = kNThreads / kChunksPerRow;
  static_assert(kNThreads % kChunksPerRow == 0 && kBlockM % kRowsPerPass == 0 && kBlockN % kRowsPerPass == 0);
};

}  // namespace gqa::kernels
