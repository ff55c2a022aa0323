// CPU forward for decode-shaped problems: one query position per sequence
// (or a few, for speculative decoding), so each KV head serves only Sq * G
// query rows. There is too little arithmetic per key for tile GEMMs to pay
// for their packing; the job is to read K and V once, at memory bandwidth.
//
// One task owns (batch element, contiguous range of keys) for every KV head.
// It streams its keys in order, in chunks: in the usual (B, S, H, D) layout
// the Hkv rows of one key are adjacent, so the task reads one sequential
// stream. Each K and V row is loaded once and used by a block of query rows
// of its group held in registers (dot products for the scores, broadcast
// FMAs for P V). A sequence's key range is split across tasks when there are
// too few sequences for the threads to balance their loads; threads claim
// tasks from a queue, and the splits are merged in split order.
#include "cpu/attention_cpu.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>

#if defined(CPU_CAPABILITY_AVX2)
#include <immintrin.h>
#endif

#include <atomic>
#include <memory>
#include <vector>

#include "cpu/tile_ops.h"

namespace gqa::cpu {
namespace CPU_CAPABILITY {
namespace {

using Vec = at::vec::Vectorized<float>;
constexpr int64_t kVS = Vec::size();
// Query rows sharing each K/V load; their accumulators fill most registers.
constexpr int kRowBlock = 4;
// Groups of up to this many query heads take one row block in the scores
// (dot_key_wide), rather than blocks of 4 and the rest.
constexpr int kMaxRowBlock = 7;
// Keys per chunk. A task reads a chunk's rows for every KV head before the
// next chunk, so in the (B, S, H, D) layout a chunk is one contiguous block;
// with 32-key chunks (rows 32 pages apart per head) the same reads ran about
// 40% slower on the test machine.
constexpr int64_t kChunk = 8;
// A thread's share of the keys is cut into this many units, the smallest
// task: small enough that a thread running slower than the others ends at
// most one unit late (see split_plan).
constexpr int64_t kUnitsPerThread = 8;
// Query rows per merge task.
constexpr int64_t kMergeGrain = 8;
// The fewest keys worth a split of its own: below this the merge costs more
// than the parallelism gains.
constexpr int64_t kMinSplitKeys = 256;
// Rows (one head's D values) up to this many bytes are prefetched a chunk
// ahead in address order when all heads' rows lie back to back; see
// decode_impl.
constexpr int64_t kBlockPrefetchMaxRowBytes = 256;

// Into L2 (prefetcht1): a chunk in L1 would evict the query rows and the
// accumulators in use. Inline assembly because GCC 12 deletes loops whose
// only statements are __builtin_prefetch calls.
inline void prefetch_l2(const char* p) {
#if defined(__x86_64__) || defined(__i386__)
  asm volatile("prefetcht1 %0" : : "m"(*p));
#else
  __builtin_prefetch(p, 0, 2);
#endif
}

// Keeps x in a register from here on. Where a value feeds several FMAs, GCC
// otherwise folds it into each as a memory operand and loads it once per use,
// and the bfloat16 loops below are bound by loads more than by FMAs.
#if defined(CPU_CAPABILITY_AVX2)
inline void pin(__m256i& x) { asm("" : "+x"(x)); }
#endif
inline void pin([[maybe_unused]] Vec& x) {
#if defined(CPU_CAPABILITY_AVX2)
  __m256 raw = x;
  asm("" : "+x"(raw));
  x = raw;
#endif
}

// acc += a * b, as one FMA into acc's register (b may be a memory operand).
// Where GCC picks the FMA's form itself it often writes the result to
// another register and copies it back: 5 copies per 16 FMAs in the bfloat16
// scores, more in P V, each taking an FP-pipe slot. llama3-8b bf16 decode
// took 0.96 to 0.98 times the time (0.91 to 0.97 with K/V in L2); fp32 and
// the other paths measured the same as before.
inline void fma_into(Vec& acc, const Vec& a, const Vec& b) {
#if defined(CPU_CAPABILITY_AVX2)
  __m256 c = acc;
  asm("vfmadd231ps %2, %1, %0" : "+x"(c) : "x"(__m256(a)), "xm"(__m256(b)));
  acc = c;
#else
  acc = at::vec::fmadd(a, b, acc);
#endif
}

// Rows to prefetch while attending to others: one set during the scores
// and one during P V, from half a head-chunk to a chunk of work ahead
// (decode_impl says which rows), long enough to cover memory latency and
// short enough to stay in L2. The hardware prefetchers would not do it:
// consecutive keys of one head are a whole (Hkv, D) row apart, usually a
// page or more.
struct PrefetchRows {
  // n rows from first, stride bytes apart.
  struct Rows {
    const char* first = nullptr;
    int64_t stride = 0, n = 0;
  };
  Rows scores, pv;  // prefetched during the scores, and during P V
  int64_t row_bytes = 0;

  // Row j of those prefetched during the scores or during P V, so that the
  // requests are spread over the work rather than issued in bursts.
  void scores_row(int64_t j) const { row(scores, j, 0); }
  void pv_row(int64_t j) const { row(pv, j, 0); }

  // Whether P V prefetches its rows a line at a time rather than a row at a
  // time (see pv_block): for rows longer than four lines.
  bool pv_by_lines() const { return pv.n > 0 && row_bytes > 256; }
  // P V's row j, or `other` (a row in use) where there is none, so that the
  // loop prefetching it needs no test.
  const char* pv_row_or(int64_t j, const void* other) const {
    return j < pv.n ? pv.first + j * pv.stride : static_cast<const char*>(other);
  }
  // What P V left: bytes [done, row_bytes) of its rows [0, nk), and rows [nk, n).
  void pv_rest(int64_t nk, int64_t done) const {
    for (int64_t j = 0; j < pv.n; ++j) row(pv, j, j < nk ? (done + 63) / 64 * 64 : 0);
  }

 private:
  void row(const Rows& r, int64_t j, int64_t from) const {
    if (j >= r.n) return;
    for (int64_t off = from; off < row_bytes; off += 64) prefetch_l2(r.first + j * r.stride + off);
  }
};

// bfloat16 K/V read as pairs: a 32-byte load of 16 values gives the even
// ones (shifted into fp32 position) and the odd ones (masked) as two fp32
// vectors, two cheap integer ops where converting each half costs a widening
// shuffle and a shift. The query rows and the output accumulators are kept
// in the same order (within each 16 columns: the 8 even ones, then the 8 odd
// ones) and put back in order at the end. Only for head dims that are
// multiples of 16, on AVX2.
struct Bf16Pairs {
  uint16_t bits;
  explicit operator float() const { return static_cast<float>(c10::BFloat16(bits, c10::BFloat16::from_bits())); }
};
#if defined(CPU_CAPABILITY_AVX2)
constexpr bool kHasBf16Pairs = true;
#else
constexpr bool kHasBf16Pairs = false;
#endif

// Columns [0, 16) of a row as two fp32 vectors: in order, or for Bf16Pairs
// the even and the odd columns.
template <typename T>
inline void load_pair(const T* p, Vec& lo, Vec& hi);

template <typename T>
inline Vec load_f32(const T* p) {
  static_assert(!std::is_same_v<T, Bf16Pairs>, "Bf16Pairs rows are read by load_pair only");
  if constexpr (std::is_same_v<T, float>) {
    return Vec::loadu(p);
  } else {
    Vec out;
    at::vec::load_to_float(p, out);
    return out;
  }
}

template <typename T>
inline void load_pair(const T* p, Vec& lo, Vec& hi) {
#if defined(CPU_CAPABILITY_AVX2)
  if constexpr (std::is_same_v<T, Bf16Pairs>) {
    __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    pin(raw);  // one load for both halves, not one per half
    lo = _mm256_castsi256_ps(_mm256_slli_epi32(raw, 16));
    hi = _mm256_castsi256_ps(_mm256_and_si256(raw, _mm256_set1_epi32(static_cast<int>(0xffff0000u))));
    return;
  }
#endif
  if constexpr (!std::is_same_v<T, Bf16Pairs>) {
    lo = load_f32(p);
    hi = load_f32(p + kVS);
  }
}

// Row r of n values into dst in the order the kernel keeps it in.
template <typename T, typename scalar_t>
inline void load_row(const scalar_t* src, int64_t n, float* dst) {
  at::vec::convert(src, dst, n);
  if constexpr (std::is_same_v<T, Bf16Pairs>) {
    for (int64_t c = 0; c < n; c += 2 * kVS) {
      float tmp[2 * kVS];
      std::copy_n(dst + c, 2 * kVS, tmp);
      for (int64_t j = 0; j < kVS; ++j) dst[c + j] = tmp[2 * j], dst[c + kVS + j] = tmp[2 * j + 1];
    }
  }
}

// The inverse of load_row's order, in place.
template <typename T>
inline void restore_order(float* row, int64_t n) {
  if constexpr (std::is_same_v<T, Bf16Pairs>) {
    for (int64_t c = 0; c < n; c += 2 * kVS) {
      float tmp[2 * kVS];
      std::copy_n(row + c, 2 * kVS, tmp);
      for (int64_t j = 0; j < kVS; ++j) row[c + 2 * j] = tmp[j], row[c + 2 * j + 1] = tmp[kVS + j];
    }
  }
}

#if defined(CPU_CAPABILITY_AVX2)
// The sums of eight vectors' lanes in one vector, lane i the sum of a_i: a
// tree of horizontal adds, then the two 128-bit halves added. By value:
// taking the accumulators' address makes GCC keep them on the stack.
inline __m256 lane_sums8(__m256 a0, __m256 a1, __m256 a2, __m256 a3, __m256 a4, __m256 a5, __m256 a6, __m256 a7) {
  const __m256 h0 = _mm256_hadd_ps(a0, a1), h1 = _mm256_hadd_ps(a2, a3);
  const __m256 h2 = _mm256_hadd_ps(a4, a5), h3 = _mm256_hadd_ps(a6, a7);
  const __m256 h01 = _mm256_hadd_ps(h0, h1), h23 = _mm256_hadd_ps(h2, h3);
  return _mm256_add_ps(_mm256_permute2f128_ps(h01, h23, 0x20), _mm256_permute2f128_ps(h01, h23, 0x31));
}
#endif

// q_r . k_j for NR query rows (fp32, D apart) and NK keys (kss apart), into
// s[r * kChunk + j]. Each accumulator is a chain of dependent FMAs; NR x NK
// of them keep both FMA pipes busy through the FMA latency.
template <int NR, int NK, typename T>
inline void dot_keys(const float* q, int64_t D, const T* k, int64_t kss, float* s) {
  const int64_t Dv = D - D % kVS;
  Vec a[NR][NK];
  for (int r = 0; r < NR; ++r)
    for (int c = 0; c < NK; ++c) a[r][c] = Vec(0.f);
  int64_t d = 0;
  for (; d + 2 * kVS <= D; d += 2 * kVS) {
    Vec lo[NK], hi[NK];
    for (int c = 0; c < NK; ++c) load_pair(k + c * kss + d, lo[c], hi[c]);
    for (int r = 0; r < NR; ++r) {
      Vec q_lo = Vec::loadu(q + r * D + d), q_hi = Vec::loadu(q + r * D + d + kVS);
      // Loaded once for the NK keys: 12 loads per 16 FMAs for fp32 rather
      // than 20, and a host that loads one vector a cycle is bound by loads
      // at 20. There llama3-8b fp32 decode took 0.96 to 0.98 times the time;
      // on the faster host of earlier sessions it had measured 1.03, in the noise.
      if constexpr (NK > 1) pin(q_lo), pin(q_hi);
      for (int c = 0; c < NK; ++c) fma_into(a[r][c], lo[c], q_lo), fma_into(a[r][c], hi[c], q_hi);
    }
  }
  if constexpr (!std::is_same_v<T, Bf16Pairs>) {
    for (; d < Dv; d += kVS) {
      Vec kv[NK];
      for (int c = 0; c < NK; ++c) kv[c] = load_f32(k + c * kss + d);
      for (int r = 0; r < NR; ++r) {
        const Vec qv = Vec::loadu(q + r * D + d);
        for (int c = 0; c < NK; ++c) fma_into(a[r][c], kv[c], qv);
      }
    }
  }
  // The NR x NK horizontal sums. Spilled once to a plain array: reducing the
  // accumulators in place takes their address, and GCC then writes them to
  // the stack on every iteration of the loop above.
  alignas(64) float t[NR][NK];
#if defined(CPU_CAPABILITY_AVX2)
  if constexpr (NR == 4 && NK == 2) {
    _mm256_store_ps(&t[0][0], lane_sums8(a[0][0], a[0][1], a[1][0], a[1][1], a[2][0], a[2][1], a[3][0], a[3][1]));
  } else
#endif
  {
    alignas(64) float lanes[NR][NK][kVS];
    for (int r = 0; r < NR; ++r)
      for (int c = 0; c < NK; ++c) a[r][c].store(lanes[r][c]);
    for (int r = 0; r < NR; ++r)
      for (int c = 0; c < NK; ++c) {
        t[r][c] = 0.f;
        for (int64_t l = 0; l < kVS; ++l) t[r][c] += lanes[r][c][l];
      }
  }
  for (int r = 0; r < NR; ++r)
    for (int c = 0; c < NK; ++c) s[r * kChunk + c] = t[r][c];
  if (!std::is_same_v<T, Bf16Pairs> && Dv < D) {  // head dims off the vector width
    for (int r = 0; r < NR; ++r)
      for (int c = 0; c < NK; ++c)
        for (int64_t d = Dv; d < D; ++d) s[r * kChunk + c] += q[r * D + d] * static_cast<float>(k[c * kss + d]);
  }
}

// q_r . k for NR = 5 to 7 query rows and one key, into s[r * kChunk]. Two
// accumulators a row (columns 0-7 and 8-15 of each 16, or the even and odd
// ones for Bf16Pairs) make 2 NR <= 14 independent FMA chains, and the query
// vectors are FMA memory operands, so that the accumulators and one K load
// fill the 16 registers. Against blocks of 4 and NR - 4 rows, each with key
// pairs, a K vector is loaded and widened once per key rather than twice.
template <int NR, typename T>
inline void dot_key_wide(const float* q, int64_t D, const T* k, float* s) {
  static_assert(NR > kRowBlock && NR <= kMaxRowBlock);
  const int64_t Dv = D - D % kVS;
  Vec a[NR], b[NR];
  for (int r = 0; r < NR; ++r) a[r] = b[r] = Vec(0.f);
  int64_t d = 0;
  for (; d + 2 * kVS <= D; d += 2 * kVS) {
    Vec lo, hi;
    load_pair(k + d, lo, hi);
    for (int r = 0; r < NR; ++r) {
      fma_into(a[r], lo, Vec::loadu(q + r * D + d));
      fma_into(b[r], hi, Vec::loadu(q + r * D + d + kVS));
    }
  }
  if constexpr (!std::is_same_v<T, Bf16Pairs>) {
    for (; d < Dv; d += kVS) {
      const Vec kv = load_f32(k + d);
      for (int r = 0; r < NR; ++r) fma_into(a[r], kv, Vec::loadu(q + r * D + d));
    }
  }
  for (int r = 0; r < NR; ++r) a[r] = a[r] + b[r];
  alignas(64) float t[kVS];
#if defined(CPU_CAPABILITY_AVX2)
  // The NR sums in one vector (the missing rows zero).
  Vec x[8];
  for (int r = 0; r < 8; ++r) x[r] = r < NR ? a[r] : Vec(0.f);
  _mm256_store_ps(t, lane_sums8(x[0], x[1], x[2], x[3], x[4], x[5], x[6], x[7]));
#else
  alignas(64) float lanes[kVS];
  for (int r = 0; r < NR; ++r) {
    a[r].store(lanes);
    t[r] = 0.f;
    for (int64_t i = 0; i < kVS; ++i) t[r] += lanes[i];
  }
#endif
  for (int r = 0; r < NR; ++r) s[r * kChunk] = t[r];
  if (!std::is_same_v<T, Bf16Pairs> && Dv < D) {  // head dims off the vector width
    for (int r = 0; r < NR; ++r)
      for (int64_t d = Dv; d < D; ++d) s[r * kChunk] += q[r * D + d] * static_cast<float>(k[d]);
  }
}

// Also prefetches pf's rows for the scores, one per key.
template <int NR, typename T>
void scores_block(const float* q, int64_t D, const T* k, int64_t kss, int64_t nk, float* s,
                  const PrefetchRows& pf) {
  int64_t j = 0;
  if constexpr (NR > kRowBlock) {
    for (; j < nk; ++j) {
      pf.scores_row(j);
      dot_key_wide<NR>(q, D, k + j * kss, s + j);
    }
  } else {
    for (; j + 2 <= nk; j += 2) {
      pf.scores_row(j);
      pf.scores_row(j + 1);
      dot_keys<NR, 2>(q, D, k + j * kss, kss, s + j);
    }
    if (j < nk) {
      pf.scores_row(j++);
      dot_keys<NR, 1>(q, D, k + (nk - 1) * kss, kss, s + nk - 1);
    }
  }
  for (; j < pf.scores.n; ++j) pf.scores_row(j);
}

// acc_r[0:D] += sum_j p[r * kChunk + j] * v_j for NR rows (acc rows D apart)
// and nk value rows (vss apart). Columns go in blocks of two vectors so that
// the NR x 2 accumulators stay in registers across the keys.
//
// Also prefetches pf's rows for P V. Long rows go a line per key in each
// column block that starts a line, at the offset being read, so that the
// requests spread over the work; short rows go whole, in the first column
// block. From memory, whole fp32 rows of 128 (eight lines a key in one
// column block) ran 5 to 15% slower than lines (llama3-8b and qwen2.5-7b
// decode, 4096 keys); for bfloat16 rows (four lines) lines were no faster,
// and slower for qwen's group of 7, which runs out of instructions before
// memory.
template <int NR, typename T>
void pv_block(const float* p, const T* v, int64_t vss, int64_t nk, float* acc, int64_t D,
              const PrefetchRows& pf) {
  constexpr int64_t es = sizeof(T);
  enum Prefetch { kNone, kLine, kWhole };
  const bool by_lines = pf.pv_by_lines();
  const char* pf_rows[kChunk];
  if (by_lines)
    for (int64_t j = 0; j < nk; ++j) pf_rows[j] = pf.pv_row_or(j, v + j * vss);
  const auto col_block = [&](int64_t d, auto prefetch) {
    Vec a0[NR], a1[NR];
    for (int r = 0; r < NR; ++r) {
      a0[r] = Vec::loadu(acc + r * D + d);
      a1[r] = Vec::loadu(acc + r * D + d + kVS);
    }
    for (int64_t j = 0; j < nk; ++j) {
      if constexpr (prefetch == kLine) prefetch_l2(pf_rows[j] + d * es);
      if constexpr (prefetch == kWhole) pf.pv_row(j);
      Vec v0, v1;
      load_pair(v + j * vss + d, v0, v1);
      for (int r = 0; r < NR; ++r) {
        const Vec pr(p[r * kChunk + j]);
        fma_into(a0[r], pr, v0), fma_into(a1[r], pr, v1);
      }
    }
    for (int r = 0; r < NR; ++r) {
      a0[r].store(acc + r * D + d);
      a1[r].store(acc + r * D + d + kVS);
    }
  };
  int64_t d = 0;
  for (; d + 2 * kVS <= D; d += 2 * kVS) {
    if (by_lines && d * es % 64 == 0) {
      col_block(d, std::integral_constant<Prefetch, kLine>{});
    } else if (!by_lines && d == 0 && pf.pv.n > 0) {
      col_block(d, std::integral_constant<Prefetch, kWhole>{});
    } else {
      col_block(d, std::integral_constant<Prefetch, kNone>{});
    }
  }
  const int64_t blocks_end = d;  // the column blocks above read (and prefetched) up to here
  if constexpr (!std::is_same_v<T, Bf16Pairs>) {  // Bf16Pairs: D is a multiple of 16
    for (; d + kVS <= D; d += kVS) {
      Vec a[NR];
      for (int r = 0; r < NR; ++r) a[r] = Vec::loadu(acc + r * D + d);
      for (int64_t j = 0; j < nk; ++j) {
        const Vec v0 = load_f32(v + j * vss + d);
        for (int r = 0; r < NR; ++r) fma_into(a[r], Vec(p[r * kChunk + j]), v0);
      }
      for (int r = 0; r < NR; ++r) a[r].store(acc + r * D + d);
    }
    for (; d < D; ++d)
      for (int r = 0; r < NR; ++r) {
        float x = acc[r * D + d];
        for (int64_t j = 0; j < nk; ++j) x += p[r * kChunk + j] * static_cast<float>(v[j * vss + d]);
        acc[r * D + d] = x;
      }
  }
  pf.pv_rest(nk, by_lines ? blocks_end * es : blocks_end > 0 ? pf.row_bytes : 0);
}

// P V for NR rows, in blocks of at most kRowBlock, whose 2 NR accumulators
// fill the registers; the first block prefetches.
template <int NR, typename T>
void pv_rows(const float* p, const T* v, int64_t vss, int64_t nk, float* acc, int64_t D,
             const PrefetchRows& pf) {
  if constexpr (NR > kRowBlock) {
    pv_block<kRowBlock>(p, v, vss, nk, acc, D, pf);
    pv_block<NR - kRowBlock>(p + kRowBlock * kChunk, v, vss, nk, acc + kRowBlock * D, D, PrefetchRows{});
  } else {
    pv_block<NR>(p, v, vss, nk, acc, D, pf);
  }
}

#if defined(CPU_CAPABILITY_AVX2)
// 2^y for y <= kMaxLag, the exponentials of the softmax in base 2:
// 2^round(y) goes straight into the exponent bits and 2^f, f in [-1/2, 1/2],
// is a degree-5 polynomial (relative error 3e-7 near y = 0, growing as y's
// own rounding with |y|). Valid up to y = 126 (the exponent field's
// range); the softmax passes y <= kMaxLag. ATen's exp_u20 also covers overflow, and spent more FMA-pipe
// instructions per vector; in the decode loop, on a host with one FMA pipe,
// those compete with the dot products.
constexpr float kLog2e = 1.44269504088896341f;
// How far (in powers of 2) a row's scores may rise above its stored max m
// before the max moves: exponentials up to 2^8 stay far from overflowing
// the fp32 sums, and a chunk whose scores all stay below that needs no max
// of its own (the conditional rescaling of FlashAttention-4).
constexpr float kMaxLag = 8.f;
inline __m256 exp2_bounded(__m256 y) {
  // Adding 1.5 * 2^23 rounds y to an integer held in the low mantissa bits;
  // shifted by 23 those bits are round(y) in the exponent field.
  const __m256 magic = _mm256_set1_ps(12582912.f);
  y = _mm256_max_ps(y, _mm256_set1_ps(-125.f));  // 2^-125 is still normal: below it, 0 would be as good
  const __m256 t = _mm256_add_ps(y, magic);
  const __m256 f = _mm256_sub_ps(y, _mm256_sub_ps(t, magic));
  __m256 p = _mm256_set1_ps(1.2915651e-3f);
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(9.6685356e-3f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(5.5516887e-2f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(2.4022265e-1f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(6.9314647e-1f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.f));
  const __m256i n = _mm256_slli_epi32(_mm256_castps_si256(t), 23);
  return _mm256_castsi256_ps(_mm256_add_epi32(_mm256_castps_si256(p), n));
}

// The online-softmax update of NR <= 4 rows over a whole chunk without
// softcap, when a chunk is one vector, from their unscaled scores S; the
// exponentials go to p (row r at p + r * kChunk). The exponentials are taken
// against the rows' stored maxima m, as long as no score of the chunk lies
// more than kMaxLag (base 2) above its row's: then the chunk's own maxima,
// a reduction tree at the head of the dependency chain from the scores to
// P V, are not needed. Otherwise (a task's first chunk, m = -inf, or a
// score that far up) the four maxima come from one joint reduction tree
// (fewer than 4 rows fill it with copies of the last), m moves to them and
// the rows whose max moved are rescaled. The four sums also come from one
// tree. The general path (transform_scores, exp_shift_sum) spent about a
// seventh of the kernel's instructions on these 8 keys; one row at a time,
// each with its own horizontal reductions, took about a sixth of the time
// from L2 for groups of 4, and for Qwen's group of 7 (now a tree of 4 rows
// and one of 3) bf16 decode ran 4 to 6% slower.
template <int NR>
inline void softmax_rows_vec(const __m256 (&S)[NR], float scale, float* acc, int64_t D, float* m, float* l,
                             float* p) {
  static_assert(NR >= 1 && NR <= 4 && kChunk == kVS);
  // Row r's exponents in base 2 against its stored max: (S scale - m) log2(e).
  const __m256 c = _mm256_set1_ps(scale * kLog2e);
  const auto exponents = [&](int r) { return _mm256_fmadd_ps(S[r], c, _mm256_set1_ps(-m[r] * kLog2e)); };
  __m256 Y[4];
  for (int r = 0; r < NR; ++r) Y[r] = exponents(r);
  __m256 y_max = Y[0];
  for (int r = 1; r < NR; ++r) y_max = _mm256_max_ps(y_max, Y[r]);
  // Rarely taken once a task has seen a chunk. m = -inf (a task's first
  // chunk) makes Y +inf, which takes it; a NaN score compares false and
  // gives NaN either way.
  if (_mm256_movemask_ps(_mm256_cmp_ps(y_max, _mm256_set1_ps(kMaxLag), _CMP_GT_OQ))) [[unlikely]] {
    __m256 X[4];
    for (int r = 0; r < 4; ++r) X[r] = _mm256_mul_ps(S[std::min(r, NR - 1)], _mm256_set1_ps(scale));
    // Row maxima: lanes (r0, r1) then (r2, r3) pairwise, then the halves.
    const __m256 u0 = _mm256_max_ps(_mm256_unpacklo_ps(X[0], X[1]), _mm256_unpackhi_ps(X[0], X[1]));
    const __m256 u1 = _mm256_max_ps(_mm256_unpacklo_ps(X[2], X[3]), _mm256_unpackhi_ps(X[2], X[3]));
    const __m256 v = _mm256_max_ps(_mm256_shuffle_ps(u0, u1, 0x44), _mm256_shuffle_ps(u0, u1, 0xee));
    // Each 128-bit half of v holds the four rows' maxima over its columns.
    alignas(16) float mx[4];
    _mm_store_ps(mx, _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1)));
    for (int r = 0; r < NR; ++r) {
      move_row_max(acc + r * D, D, m[r], l[r], std::max(m[r], mx[r]));
      Y[r] = exponents(r);
    }
  }
  __m256 E[4];
  for (int r = 0; r < NR; ++r) {
    E[r] = exp2_bounded(Y[r]);
    _mm256_storeu_ps(p + r * kChunk, E[r]);
  }
  for (int r = NR; r < 4; ++r) E[r] = E[NR - 1];
  // Horizontal adds within the 128-bit halves, then one add of the halves.
  const __m256 h = _mm256_hadd_ps(_mm256_hadd_ps(E[0], E[1]), _mm256_hadd_ps(E[2], E[3]));
  const __m128 sums = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
  if constexpr (NR == 4) {
    _mm_storeu_ps(l, _mm_add_ps(_mm_loadu_ps(l), sums));
  } else {
    alignas(16) float t[4];
    _mm_store_ps(t, sums);
    for (int r = 0; r < NR; ++r) l[r] += t[r];
  }
}

// softmax_rows_vec for NR rows of scores in s, overwritten by the
// exponentials: blocks of 4, then the rest.
template <int NR>
inline void softmax_chunk_vec(float* s, float scale, float* acc, int64_t D, float* m, float* l) {
  constexpr int n = NR < 4 ? NR : 4;
  __m256 S[n];
  for (int r = 0; r < n; ++r) S[r] = _mm256_loadu_ps(s + r * kChunk);
  softmax_rows_vec<n>(S, scale, acc, D, m, l, s);
  if constexpr (NR > 4) softmax_chunk_vec<NR - 4>(s + 4 * kChunk, scale, acc + 4 * D, D, m + 4, l + 4);
}
#endif

#if defined(CPU_CAPABILITY_AVX2)
// dot_keys<4, 2> for bfloat16 pairs, not reduced: g[r] holds row r's two
// sums over each 4 of the 8 lanes, (k 01, k 23, k' 01, k' 23 | k 45, k 67,
// k' 45, k' 67) in lane pairs, for attend_rows4_chunk to finish.
inline void dot_rows4_keys2(const float* q, int64_t D, const Bf16Pairs* k0, const Bf16Pairs* k1, __m256 (&g)[4]) {
  Vec a[4][2];
  for (int r = 0; r < 4; ++r) a[r][0] = a[r][1] = Vec(0.f);
  for (int64_t d = 0; d < D; d += 2 * kVS) {
    Vec lo0, hi0, lo1, hi1;
    load_pair(k0 + d, lo0, hi0);
    load_pair(k1 + d, lo1, hi1);
    for (int r = 0; r < 4; ++r) {
      Vec q_lo = Vec::loadu(q + r * D + d), q_hi = Vec::loadu(q + r * D + d + kVS);
      pin(q_lo), pin(q_hi);
      fma_into(a[r][0], q_lo, lo0), fma_into(a[r][1], q_lo, lo1);
      fma_into(a[r][0], q_hi, hi0), fma_into(a[r][1], q_hi, hi1);
    }
  }
  for (int r = 0; r < 4; ++r) g[r] = _mm256_hadd_ps(a[r][0], a[r][1]);
}

// attend_block for 4 bfloat16-pair rows (groups of 4, or of 8 as two blocks:
// LLaMA-3, Mistral) and a whole chunk without softcap, with fewer
// instructions around the FMAs:
// - the scores stay in registers: each row's partial sums over the four
//   key pairs are reduced into its score vector, which goes straight to the
//   softmax, where scores_block stores each pair's sums for it to reload;
// - P V runs with its key loop unrolled, and prefetches one row of pf's
//   P V set per column block where pv_block issues the whole set (32 lines
//   for D 128) in the first.
// llama3-8b bf16 decode from memory took 0.94 to 0.96 times the time of the
// general path (5 runs); with pv_block for P V it took 1.007 times.
// Always inlined: into attend_chunk_rows4, which takes most whole chunks
// (see there), and through attend_block into decode_impl for the rest
// (several query positions, heads apart in memory).
[[gnu::always_inline]] inline void attend_rows4_chunk(const float* q, const Bf16Pairs* k, int64_t kss,
                                                      const Bf16Pairs* v, int64_t vss, int64_t D, float scale,
                                                      float* acc, float* m, float* l, const PrefetchRows& pf) {
  static_assert(kChunk == 8 && kVS == 8);
  __m256 g[4][4];  // key pair i, row r: see dot_rows4_keys2
  for (int i = 0; i < 4; ++i) {
    pf.scores_row(2 * i);
    pf.scores_row(2 * i + 1);
    dot_rows4_keys2(q, D, k + 2 * i * kss, k + (2 * i + 1) * kss, g[i]);
  }
  // Row r's sums over the two 128-bit halves, keys 0 to 3 and 4 to 7; one
  // add of the halves then gives its eight scores in order, with two
  // lane-crossing permutes a row (on Zen each costs about four FMAs' slots)
  // where reducing each key pair first and transposing took three.
  __m256 S[4];
  for (int r = 0; r < 4; ++r) {
    const __m256 h0 = _mm256_hadd_ps(g[0][r], g[1][r]), h1 = _mm256_hadd_ps(g[2][r], g[3][r]);
    S[r] = _mm256_add_ps(_mm256_permute2f128_ps(h0, h1, 0x20), _mm256_permute2f128_ps(h0, h1, 0x31));
  }
  alignas(32) float p[4 * kChunk];
  softmax_rows_vec<4>(S, scale, acc, D, m, l, p);
  const int64_t ncb = D / (2 * kVS);
  for (int64_t c = 0; c < ncb; ++c) {
    const int64_t d = c * 2 * kVS;
    pf.pv_row(c);
    const float* pp = p;
    // Without this GCC keeps the 32 broadcast addresses of the unrolled loop
    // live across it, spilled to the stack and reloaded for every broadcast.
    asm("" : "+r"(pp));
    Vec a0[4], a1[4];
    for (int r = 0; r < 4; ++r) {
      a0[r] = Vec::loadu(acc + r * D + d);
      a1[r] = Vec::loadu(acc + r * D + d + kVS);
    }
#pragma GCC unroll 8
    for (int j = 0; j < kChunk; ++j) {
      Vec v0, v1;
      load_pair(v + j * vss + d, v0, v1);
      for (int r = 0; r < 4; ++r) {
        const Vec pr(pp[r * kChunk + j]);
        fma_into(a0[r], pr, v0), fma_into(a1[r], pr, v1);
      }
    }
    for (int r = 0; r < 4; ++r) {
      a0[r].store(acc + r * D + d);
      a1[r].store(acc + r * D + d + kVS);
    }
  }
  for (int64_t j = ncb; j < pf.pv.n; ++j) pf.pv_row(j);
}
#endif

// One block of nr <= kMaxRowBlock query rows against keys [c0, c0 + nk): scores,
// the online-softmax update of the rows' max m and sum l, then P V into acc.
template <int NR, typename T>
void attend_block(const float* q, const T* k, int64_t kss, const T* v, int64_t vss, int64_t nk, int64_t D,
                  float scale, float cap, float* s, float* acc, float* m, float* l, const PrefetchRows& pf) {
#if defined(CPU_CAPABILITY_AVX2)
  if constexpr (NR == 4 && std::is_same_v<T, Bf16Pairs>) {
    if (nk == kChunk && cap == 0) return attend_rows4_chunk(q, k, kss, v, vss, D, scale, acc, m, l, pf);
  }
#endif
  scores_block<NR>(q, D, k, kss, nk, s, pf);
#if defined(CPU_CAPABILITY_AVX2)
  if (nk == kChunk && cap == 0) {
    softmax_chunk_vec<NR>(s, scale, acc, D, m, l);
    return pv_rows<NR>(s, v, vss, nk, acc, D, pf);
  }
#endif
  for (int r = 0; r < NR; ++r) {
    float* sr = s + r * kChunk;
    const float m_new = std::max(m[r], transform_scores<float>(sr, nullptr, nk, scale, cap));
    const float l_new = exp_shift_sum(sr, nk, m_new);
    move_row_max(acc + r * D, D, m[r], l[r], m_new);
    l[r] += l_new;
  }
  pv_rows<NR>(s, v, vss, nk, acc, D, pf);
}

template <typename T>
void attend_rows(int64_t nr, const float* q, const T* k, int64_t kss, const T* v, int64_t vss, int64_t nk,
                 int64_t D, float scale, float cap, float* s, float* acc, float* m, float* l,
                 const PrefetchRows& pf) {
  static_assert(kRowBlock == 4 && kMaxRowBlock == 7);
  switch (nr) {
    case 1: return attend_block<1>(q, k, kss, v, vss, nk, D, scale, cap, s, acc, m, l, pf);
    case 2: return attend_block<2>(q, k, kss, v, vss, nk, D, scale, cap, s, acc, m, l, pf);
    case 3: return attend_block<3>(q, k, kss, v, vss, nk, D, scale, cap, s, acc, m, l, pf);
    case 4: return attend_block<4>(q, k, kss, v, vss, nk, D, scale, cap, s, acc, m, l, pf);
    case 5: return attend_block<5>(q, k, kss, v, vss, nk, D, scale, cap, s, acc, m, l, pf);
    case 6: return attend_block<6>(q, k, kss, v, vss, nk, D, scale, cap, s, acc, m, l, pf);
    default: return attend_block<7>(q, k, kss, v, vss, nk, D, scale, cap, s, acc, m, l, pf);
  }
}

// What head hkv prefetches in decode_impl's block prefetch (see there): of
// the next chunk's K and V blocks (n rows of D values from k and from v) cut
// into 2 Hkv slices, K's then V's, slices 2 hkv and 2 hkv + 1.
template <typename scalar_t>
PrefetchRows next_chunk_slices(const scalar_t* k, const scalar_t* v, int64_t n, int64_t Hkv, int64_t D, int64_t hkv) {
  constexpr int64_t es = sizeof(scalar_t);
  PrefetchRows pf{.row_bytes = D * es};
  if (n == 0) return pf;
  const auto slice = [&](int64_t c) {
    const scalar_t* first = c < Hkv ? k + c * n * D : v + (c - Hkv) * n * D;
    return PrefetchRows::Rows{reinterpret_cast<const char*>(first), D * es, n};
  };
  pf.scores = slice(2 * hkv), pf.pv = slice(2 * hkv + 1);
  return pf;
}

#if defined(CPU_CAPABILITY_AVX2)
// attend_rows4_chunk for every KV head of one whole chunk of bfloat16 keys
// that one query position sees, no softcap, groups of a multiple of 4, the
// rows of all heads back to back (k and v: the chunk's first row), and the
// block prefetch of the next chunk (n rows from next_k and next_v).
// Out of line, with attend_rows4_chunk and its softmax inlined: in
// decode_impl's loop, with the task's state live around them, GCC kept the
// softmax out of line (inlining it there ran 5% slower) and copied and
// spilled the accumulators of P V (85 register copies in the loop against
// 23 here). llama3-8b bf16 decode took 0.95 to 0.97 times the time from
// memory (llama3-70b 0.96), and 0.85 to 0.98 with K/V in L2.
//
// kD: the head dim as a constant (128, that of LLaMA-3 and Mistral, whose
// groups of 4 or 8 take this path), or 0 for D at run time. The constant
// lets GCC unroll the loops over D and drop their address arithmetic.
template <int64_t kD>
[[gnu::noinline]] void attend_chunk_rows4(const float* q, const Bf16Pairs* k, const Bf16Pairs* v, int64_t Hkv,
                                          int64_t G, int64_t D, float scale, float* acc, float* m, float* l,
                                          const Bf16Pairs* next_k, const Bf16Pairs* next_v, int64_t next_n) {
  if constexpr (kD != 0) D = kD;
  for (int64_t hkv = 0; hkv < Hkv; ++hkv) {
    PrefetchRows pf = next_chunk_slices(next_k, next_v, next_n, Hkv, D, hkv);
    for (int64_t r0 = hkv * G; r0 < (hkv + 1) * G; r0 += 4) {
      attend_rows4_chunk(q + r0 * D, k + hkv * D, Hkv * D, v + hkv * D, Hkv * D, D, scale, acc + r0 * D, m + r0,
                         l + r0, pf);
      pf.scores.n = pf.pv.n = 0;  // issued once per head-chunk
    }
  }
}
#endif

// Where a sequence's keys are split, in units of 1/n_units of them: the
// n_splits + 1 boundaries. A caller's num_splits gets equal splits. The
// heuristic's splits shrink as the queue drains (guided scheduling): each
// round gives every sequence `per_round` tasks (enough for one a thread)
// that together take half of its units left, down to single units. The
// last tasks are single units, so the threads end as close together as
// with equal splits of a unit, from fewer tasks (8 rather than 16 for one
// sequence on 2 threads). Every split costs a copy of its partial results
// and their merge: LLaMA-3-8B decode at 4096 keys ran 4 to 6% faster with
// 2 equal tasks than with 16, and 3% faster with these 8.
inline std::vector<int64_t> split_plan(int64_t n_units, int64_t per_round, bool guided) {
  std::vector<int64_t> bounds{0};
  for (int64_t left = n_units; left > 0;) {
    const int64_t size = guided ? std::max<int64_t>(1, left / (2 * per_round)) : 1;
    for (int64_t t = 0; t < per_round && left > 0; ++t) {
      const int64_t take = std::min(size, left);
      bounds.push_back(bounds.back() + take);
      left -= take;
    }
  }
  return bounds;
}

// One sequence's K or V rows (of KV head 0): dense, row_stride apart, or in
// pages of block_size rows.
template <typename T>
struct SeqRows {
  const T* base;
  int64_t row_stride;
  const int32_t* blocks = nullptr;  // the sequence's row of the block table
  int64_t block_stride = 0, block_size = 0;

  const T* row(int64_t j) const {
    if (blocks == nullptr) return base + j * row_stride;
    return base + blocks[j / block_size] * block_stride + j % block_size * row_stride;
  }
  // The end of the run of rows from j on that lie row_stride apart.
  int64_t run_end(int64_t j) const {
    return blocks == nullptr ? std::numeric_limits<int64_t>::max() : (j / block_size + 1) * block_size;
  }
  // The end of the chunk of keys from j on, in a task ending at j_end: at
  // most kChunk keys, cut at page ends so that its rows lie row_stride apart.
  int64_t chunk_end(int64_t j, int64_t j_end) const { return std::min({j + kChunk, j_end, run_end(j)}); }
};

// Sequence b's place in the tensors, from a SeqLayout.
struct SeqInfo {
  int64_t seqlen_q, seqlen_k;
  int64_t q_row0;  // its first row in q's and out's row dim (dense: b * Sq)
  int64_t k_lo, n_keys;  // the keys any of its positions sees
};

template <typename scalar_t>
void decode_impl(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const AttnParams& p,
                 const SeqLayout& seqs, int64_t max_seqlen_q, at::Tensor& out, at::Tensor& lse) {
  const bool packed_q = seqs.cu_seqlens_q != nullptr;
  const int64_t B = packed_q ? seqs.batch : q.size(0);
  const int64_t Sq = max_seqlen_q, Hq = q.size(2), D = q.size(3);
  const int64_t Hkv = k.size(2), G = Hq / Hkv;
  const int64_t Tq = q.size(1);  // packed: rows of all sequences
  const int64_t qsb = q.stride(0), qss = q.stride(1), qsh = q.stride(2);
  const int64_t ksb = k.stride(0), kss = k.stride(1), ksh = k.stride(2);
  const int64_t vsb = v.stride(0), vss = v.stride(1), vsh = v.stride(2);
  const scalar_t* qp = q.const_data_ptr<scalar_t>();
  const scalar_t* kp = k.const_data_ptr<scalar_t>();
  const scalar_t* vp = v.const_data_ptr<scalar_t>();
  scalar_t* op = out.data_ptr<scalar_t>();
  float* lsep = lse.data_ptr<float>();
  const float scale = static_cast<float>(p.softmax_scale), cap = static_cast<float>(p.softcap);

  std::vector<SeqInfo> info(B);
  int64_t max_keys = 0;
  for (int64_t b = 0; b < B; ++b) {
    SeqInfo& s = info[b];
    s.seqlen_q = packed_q ? seqs.cu_seqlens_q[b + 1] - seqs.cu_seqlens_q[b] : Sq;
    s.q_row0 = packed_q ? seqs.cu_seqlens_q[b] : b * Sq;
    s.seqlen_k = seqs.seqused_k       ? seqs.seqused_k[b] + seqs.seqused_k_add
                 : seqs.cu_seqlens_k ? seqs.cu_seqlens_k[b + 1] - seqs.cu_seqlens_k[b]
                                      : k.size(1);
    // Windows only move forward with the position: the union is one range.
    s.k_lo = 0, s.n_keys = 0;
    if (s.seqlen_q > 0) {
      const KeyRange first = visible_keys(0, s.seqlen_q, s.seqlen_k, p);
      const KeyRange last = visible_keys(s.seqlen_q - 1, s.seqlen_q, s.seqlen_k, p);
      s.k_lo = first.lo, s.n_keys = std::max<int64_t>(0, last.hi - first.lo + 1);
    }
    max_keys = std::max(max_keys, s.n_keys);
  }
  const auto k_rows = [&](int64_t b) {
    if (seqs.block_table) {
      return SeqRows<scalar_t>{kp, kss, seqs.block_table + b * seqs.block_table_stride, ksb, seqs.block_size};
    }
    return SeqRows<scalar_t>{kp + (seqs.cu_seqlens_k ? seqs.cu_seqlens_k[b] * kss : b * ksb), kss};
  };
  const auto v_rows = [&](int64_t b) {
    if (seqs.block_table) {
      return SeqRows<scalar_t>{vp, vss, seqs.block_table + b * seqs.block_table_stride, vsb, seqs.block_size};
    }
    return SeqRows<scalar_t>{vp + (seqs.cu_seqlens_k ? seqs.cu_seqlens_k[b] * vss : b * vsb), vss};
  };

  // Query rows per attend_rows call: a whole group of up to kMaxRowBlock
  // heads, else blocks of kRowBlock.
  const int64_t row_block = G <= kMaxRowBlock ? G : kRowBlock;

  // What each head-chunk prefetches. Where the rows of all KV heads lie
  // back to back (the (B, S, H, D) layout, dense, packed or paged: then a
  // chunk's K, and its V, is one block of memory) and rows are short, the
  // next chunk's two blocks are cut into 2 Hkv equal slices, K's then V's,
  // and head hkv takes slices 2 hkv and 2 hkv + 1: memory is read a chunk
  // ahead, in address order. Otherwise a head-chunk prefetches its own V
  // rows during its scores and the next head-chunk's K rows during its P V,
  // each about half a head-chunk of work ahead. From memory, llama3-8b
  // decode measured (times relative to the scheme chosen for the dtype):
  // - bfloat16 (256-byte rows): this head's V and the next head's K 1.17;
  // - fp32 (512-byte rows): the next head's K and V (the scheme before)
  //   1.06 to 1.07, blocks about 1.2.
  // Further ahead was slower: blocks two chunks ahead (bfloat16) 1.10, K
  // and V two heads ahead (fp32) 1.10.
  const bool prefetch_blocks = ksh == D && kss == Hkv * D && vsh == D && vss == Hkv * D &&
                               D * int64_t(sizeof(scalar_t)) <= kBlockPrefetchMaxRowBytes;

  // A task's rows: (KV head, query position, head of the group), so that each
  // position's G rows are adjacent and share one key range.
  const int64_t max_rows = Hkv * Sq * G;

  // Enough units for the threads to balance their loads (kUnitsPerThread
  // each), but none shorter than kMinSplitKeys; or what the caller asked for.
  const int64_t n_threads = at::get_num_threads();
  const int64_t want_units = kUnitsPerThread * n_threads;
  const int64_t want = B >= want_units ? 1 : (want_units + B - 1) / B;
  const bool guided = seqs.num_splits <= 0;
  const int64_t n_units = !guided ? std::min<int64_t>(seqs.num_splits, std::max<int64_t>(1, max_keys))
                                  : std::clamp<int64_t>(want, 1, std::max<int64_t>(1, max_keys / kMinSplitKeys));
  const std::vector<int64_t> split_units = split_plan(n_units, (n_threads + B - 1) / B, guided);
  const int64_t n_splits = int64_t(split_units.size()) - 1;
  const int64_t n_tasks = B * n_splits;
  // (batch, split, row[, D]); every element read is written first.
  std::unique_ptr<float[]> part_acc, part_m, part_l;
  if (n_splits > 1) {
    part_acc = std::make_unique_for_overwrite<float[]>(n_tasks * max_rows * D);
    part_m = std::make_unique_for_overwrite<float[]>(n_tasks * max_rows);
    part_l = std::make_unique_for_overwrite<float[]>(n_tasks * max_rows);
  }

  // The keys of task `work`: a split of sequence b, and where its partial
  // results go. Split-major, so that every sequence's large first splits
  // come before the small ones.
  struct Task {
    int64_t b, j_begin, j_end, part;
  };
  const auto task = [&](int64_t work) {
    const int64_t b = work % B, split = work / B, part = b * n_splits + split;
    const SeqInfo& si = info[b];
    if (si.seqlen_q == 0) return Task{b, 0, 0, part};
    const auto key = [&](int64_t unit) { return si.k_lo + unit * si.n_keys / n_units; };
    return Task{b, key(split_units[split]), key(split_units[split + 1]), part};
  };
  // The chunk after the current one: its first row of K and of V (KV head
  // 0) and its length; in a task's last chunk, the next task's first.
  struct NextChunk {
    const scalar_t* k = nullptr;
    const scalar_t* v = nullptr;
    int64_t n = 0;
  };
  // The chunk from key j on, in a task ending at j_end.
  const auto chunk_at = [](const SeqRows<scalar_t>& kr, const SeqRows<scalar_t>& vr, int64_t j, int64_t j_end) {
    return NextChunk{kr.row(j), vr.row(j), kr.chunk_end(j, j_end) - j};
  };

  // T is how K/V rows are read: scalar_t, or Bf16Pairs.
  const auto run = [&](auto row_type) {
    using T = decltype(row_type);
    // Row r of sequence b, from its accumulator (in the order the kernel
    // keeps rows), max and sum.
    const auto write_row = [&](int64_t b, int64_t r, float* acc_row, float m, float l) {
      const SeqInfo& s = info[b];
      const int64_t g = r % G, i = r / G % s.seqlen_q, h = r / (G * s.seqlen_q) * G + g;
      const int64_t lse_idx = packed_q ? h * Tq + s.q_row0 + i : (b * Hq + h) * Sq + i;
      restore_order<T>(acc_row, D);
      lsep[lse_idx] = finish_row(acc_row, m, l, D, op + ((s.q_row0 + i) * Hq + h) * D);
    };

  // Tasks are claimed in order from a shared counter, not dealt out in equal
  // shares: the call takes as long as its slowest thread, and on the test
  // machine one core often ran 5 to 20% slower than the other for seconds
  // at a time. A thread claims its next task as it starts the last chunk of
  // the current one, early enough to prefetch that task's first chunk and
  // late enough to leave the rest of the queue to whichever thread is free.
  std::atomic<int64_t> next_task{0};
  at::parallel_for(0, std::min(n_threads, n_tasks), 1, [&](int64_t, int64_t) {
    std::vector<float> q_buf(max_rows * D), acc(max_rows * D), m(max_rows), l(max_rows), s(kMaxRowBlock * kChunk);
    std::vector<KeyRange> ranges(Sq);
    int64_t q_b = -1;  // the sequence whose query rows q_buf and ranges hold
    for (int64_t work = next_task.fetch_add(1); work < n_tasks;) {
      const auto [b, j_begin, j_end, part] = task(work);
      const SeqInfo& si = info[b];
      const int64_t sq = si.seqlen_q, n_rows = Hkv * sq * G;
      if (b != q_b && sq > 0) {
        const scalar_t* qb = qp + (packed_q ? si.q_row0 * qss : b * qsb);
        for (int64_t r = 0; r < n_rows; ++r) {
          const int64_t g = r % G, i = r / G % sq, h = r / (G * sq) * G + g;
          load_row<T>(qb + i * qss + h * qsh, D, q_buf.data() + r * D);
        }
        for (int64_t i = 0; i < sq; ++i) ranges[i] = visible_keys(i, sq, si.seqlen_k, p);
        q_b = b;
      }
      fill(m.data(), n_rows, -std::numeric_limits<float>::infinity());
      fill(l.data(), n_rows, 0.f);
      fill(acc.data(), n_rows * D, 0.f);

      int64_t claimed = -1;  // the next task, once claimed
      const SeqRows<scalar_t> kr = k_rows(b), vr = v_rows(b);
      for (int64_t j0 = j_begin, j1 = j_begin < j_end ? kr.chunk_end(j_begin, j_end) : j_end; j0 < j_end;) {
        NextChunk next;
        if (j1 < j_end) {
          next = chunk_at(kr, vr, j1, j_end);
        } else {
          claimed = next_task.fetch_add(1);
          if (claimed < n_tasks) {
            const Task t = task(claimed);
            if (t.j_begin < t.j_end) next = chunk_at(k_rows(t.b), v_rows(t.b), t.j_begin, t.j_end);
          }
        }
        const scalar_t* kc = kr.row(j0);
        const scalar_t* vc = vr.row(j0);
#if defined(CPU_CAPABILITY_AVX2)
        if constexpr (std::is_same_v<T, Bf16Pairs>) {
          if (G % 4 == 0 && sq == 1 && cap == 0 && prefetch_blocks && j1 - j0 == kChunk && ranges[0].lo <= j0 &&
              ranges[0].hi >= j1 - 1) {
            const auto chunk_fn = D == 128 ? attend_chunk_rows4<128> : attend_chunk_rows4<0>;
            chunk_fn(q_buf.data(), reinterpret_cast<const T*>(kc), reinterpret_cast<const T*>(vc), Hkv, G, D, scale,
                     acc.data(), m.data(), l.data(), reinterpret_cast<const T*>(next.k),
                     reinterpret_cast<const T*>(next.v), next.n);
            // Not a flag that skips the loop below: in the library's build
            // that made fp32 Qwen decode 10 to 25% slower.
            j0 = j1, j1 = j1 < j_end ? j1 + next.n : j1;
            continue;
          }
        }
#endif
        for (int64_t hkv = 0; hkv < Hkv; ++hkv) {
          const scalar_t* kh = kc + hkv * ksh;
          const scalar_t* vh = vc + hkv * vsh;
          // n rows from first, step values apart.
          const auto rows = [](const scalar_t* first, int64_t step, int64_t n) {
            return PrefetchRows::Rows{reinterpret_cast<const char*>(first), step * int64_t(sizeof(scalar_t)), n};
          };
          PrefetchRows pf{.row_bytes = D * int64_t(sizeof(scalar_t))};
          if (prefetch_blocks) {
            pf = next_chunk_slices(next.k, next.v, next.n, Hkv, D, hkv);
          } else {
            pf.scores = rows(vh, vss, j1 - j0);
            if (hkv + 1 < Hkv) {  // the next head of this chunk
              pf.pv = rows(kh + ksh, kss, j1 - j0);
            } else if (next.n > 0) {  // the first head of the next chunk
              pf.pv = rows(next.k, kss, next.n);
            }
          }
          for (int64_t i = 0; i < sq; ++i) {
            const int64_t c0 = std::max(ranges[i].lo, j0), c1 = std::min(ranges[i].hi, j1 - 1);
            if (c0 > c1) continue;  // none of these keys is visible to position i
            for (int64_t g0 = 0; g0 < G; g0 += row_block) {
              const int64_t r0 = (hkv * sq + i) * G + g0;
              attend_rows(std::min<int64_t>(row_block, G - g0), q_buf.data() + r0 * D,
                          reinterpret_cast<const T*>(kh + (c0 - j0) * kss), kss,
                          reinterpret_cast<const T*>(vh + (c0 - j0) * vss), vss, c1 - c0 + 1, D, scale, cap,
                          s.data(), acc.data() + r0 * D, m.data() + r0, l.data() + r0, pf);
              pf.scores.n = pf.pv.n = 0;  // issued once per head-chunk
            }
          }
        }
        j0 = j1, j1 = j1 < j_end ? j1 + next.n : j1;
      }

      if (n_splits == 1) {
        for (int64_t r = 0; r < n_rows; ++r) write_row(b, r, acc.data() + r * D, m[r], l[r]);
      } else {
        std::copy_n(acc.data(), n_rows * D, part_acc.get() + part * max_rows * D);
        std::copy_n(m.data(), n_rows, part_m.get() + part * max_rows);
        std::copy_n(l.data(), n_rows, part_l.get() + part * max_rows);
      }
      work = claimed >= 0 ? claimed : next_task.fetch_add(1);
    }
  });

  // Row by row, so that all threads share the merge whatever the batch.
  if (n_splits > 1) {
    at::parallel_for(0, B * max_rows, kMergeGrain, [&](int64_t begin, int64_t end) {
      std::vector<float> acc(D);
      for (int64_t row = begin; row < end; ++row) {
        const int64_t b = row / max_rows, r = row % max_rows;
        if (r >= Hkv * info[b].seqlen_q * G) continue;
        const int64_t part = b * n_splits * max_rows + r;
        float m, l;
        merge_splits(n_splits, part_acc.get() + part * D, max_rows * D, part_m.get() + part, part_l.get() + part,
                     max_rows, D, acc.data(), m, l);
        write_row(b, r, acc.data(), m, l);
      }
    });
  }
  };
  if constexpr (kHasBf16Pairs && std::is_same_v<scalar_t, at::BFloat16>) {
    if (D % (2 * kVS) == 0) return run(Bf16Pairs{});
  }
  run(scalar_t{});
}

}  // namespace

void attention_fwd_decode(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const AttnParams& p,
                          const SeqLayout& seqs, int64_t max_seqlen_q, at::Tensor& out, at::Tensor& lse) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "gqa_attention_fwd_decode_cpu", [&] {
    if constexpr (std::is_same_v<scalar_t, double>) {
      TORCH_CHECK(false, "gqa: the decode kernel takes no float64");  // decode_kernel_serves says so
    } else {
      decode_impl<scalar_t>(q, k, v, p, seqs, max_seqlen_q, out, lse);
    }
  });
}

}  // namespace CPU_CAPABILITY
}  // namespace gqa::cpu
