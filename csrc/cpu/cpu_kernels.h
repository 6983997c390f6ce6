// Row-level building blocks of the CPU kernels, shared by select.cpp and gather_merge.cpp.
//
// Selection ranks scores by float_key (NaN lowest, -0.0 == +0.0). The searches keep their
// bounds as int32 keys (score_key below: float_key's order as signed int32) but scan the scores
// themselves: "key(x) > p" is exactly the float compare "x >= at_least(p)" (NaN compares false,
// as the lowest must; -0.0 == +0.0), so no key array is ever built.
// The kernels are templates on kAvx2, compiled twice in select.cpp (baseline ISA, and AVX2 picked
// at run time). The plain loops here are vectorised by the compiler for either target; the
// compactions (keep the values or indices that pass a test, in order) and the small sorts are
// not, so they have AVX2 versions (one table lookup per 8 values; a bitonic network), next to
// portable scalar ones.
#pragma once

#include <ATen/ATen.h>
#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>

#include "epic/common.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define EPIC_CPU_AVX2 1
#define EPIC_AVX2_FN __attribute__((target("avx2,popcnt")))
#else
#define EPIC_CPU_AVX2 0
#endif

namespace epic::cpu {

// Fill keys[i] = float_key(row[i * stride]) for one score row.
template <typename T>
inline void row_keys(const T* row, int64_t stride, int64_t n, uint32_t* keys) {
  for (int64_t i = 0; i < n; ++i) keys[i] = float_key(static_cast<float>(row[i * stride]));
}

// Indices of the k largest keys (float_key order) in ascending index order; ties go to the
// lower index. `scratch` is unused (kept for the callers). Defined in select.cpp.
void select_top_keys(const uint32_t* keys, int64_t n, int64_t k, uint32_t* scratch, int64_t* out);

constexpr int32_t kNanKey = INT32_MIN;  // the key of NaN, below every number

// float_key(x) ^ 0x80000000 as int32, written without branches so loops over it vectorise.
// (x + 0.0f folds -0.0 onto +0.0 under round-to-nearest; checked equal to float_key for all
// 2^32 bit patterns.)
inline int32_t score_key(float x) {
  const float y = x + 0.0f;
  const int32_t u = static_cast<int32_t>(float_bits(y));
  const int32_t s = u ^ ((u >> 31) & 0x7FFFFFFF);
  return (x == x) ? s : kNanKey;
}

// The score a key stands for (+0.0 for a zero; NaN for keys of no number).
inline float key_score(int32_t k) { return key_float(static_cast<uint32_t>(k) ^ 0x80000000u); }

// Keys of -inf and +inf: the keys between them and the ends of int32 stand for NaN bit patterns.
constexpr int32_t kMinusInfKey = -2139095041, kPlusInfKey = 2139095040;  // 0x807FFFFF, 0x7F800000

// The float L with {x : key(x) > p} == {x : x >= L} for any int64 p: the smallest score with a
// key above p (key_score(-1) is -0.0, which compares like +0.0), -inf below the keys of numbers,
// NaN (nothing compares >= it) above them.
inline float at_least(int64_t p) {
  if (p < kMinusInfKey) return -INFINITY;
  if (p >= kPlusInfKey) return NAN;
  return key_score(static_cast<int32_t>(p + 1));
}

// #NaN in x[0..n).
inline int64_t count_nan(const float* x, int64_t n) {
  int32_t c = 0;  // int32 lanes vectorise best; callers pass < 2^31 values
  for (int64_t i = 0; i < n; ++i) c += x[i] != x[i];
  return c;
}

// above[p] = #{i : x[i] >= f[p]} for P bounds in one pass (NaN counts nowhere). int32 lane
// counters (what the compiler vectorises best) are flushed into the totals every 2^30 values.
template <int P>
inline void count_above(const float* x, int64_t n, const float* f, int64_t* above) {
  float pv[P];
  for (int p = 0; p < P; ++p) pv[p] = f[p], above[p] = 0;
  for (int64_t i0 = 0; i0 < n; i0 += (int64_t(1) << 30)) {
    const int64_t i1 = std::min(n, i0 + (int64_t(1) << 30));
    int32_t c[P] = {};
    for (int64_t i = i0; i < i1; ++i) {
      const float v = x[i];
      for (int p = 0; p < P; ++p) c[p] += v >= pv[p];
    }
    for (int p = 0; p < P; ++p) above[p] += c[p];
  }
}

// Keys of max{x < f} and min{x >= f} over the numbers of x[0..n) (both must exist). Reduced as
// ordered bit patterns with masks (the form the compiler vectorises; float ?: is not); -0.0
// and +0.0 differ there, but both fold to key 0 at the end.
inline void max_min_around(const float* x, int64_t n, float f, int32_t* lo, int32_t* hi) {
  int32_t mx = INT32_MIN, mn = INT32_MAX;
  for (int64_t i = 0; i < n; ++i) {
    const float v = x[i];
    const int32_t u = static_cast<int32_t>(float_bits(v));
    const int32_t k = u ^ ((u >> 31) & 0x7FFFFFFF);  // ordered for numbers; NaN is masked out
    const int32_t below = -static_cast<int32_t>(v < f), at_or_above = -static_cast<int32_t>(v >= f);
    mx = std::max(mx, (k & below) | (INT32_MIN & ~below));
    mn = std::min(mn, (k & at_or_above) | (INT32_MAX & ~at_or_above));
  }
  const auto to_score = [](int32_t k) { return bits_float(static_cast<uint32_t>(k ^ ((k >> 31) & 0x7FFFFFFF))); };
  *lo = score_key(to_score(mx)), *hi = score_key(to_score(mn));
}

// One search pass of one query: above[p] = #{x >= f[p]} for its NP bounds, and the values in
// [keep_lo, keep_hi) copied in order to out (room for them plus 8).
template <int NP>
struct RangePass {
  float f[NP];
  float keep_lo, keep_hi;
  float* out;
  int64_t above[NP], kept = 0;
};

template <int NP>
inline void range_pass_scalar(const float* x, int64_t n, RangePass<NP>* rp, int nr) {
  for (int t = 0; t < nr; ++t) {
    // Locals, not rp's fields: stores through `out` could alias them and force reloads.
    float f[NP];
    int64_t c[NP] = {}, j = 0;
    std::copy(rp[t].f, rp[t].f + NP, f);
    const float lo = rp[t].keep_lo, hi = rp[t].keep_hi;
    float* out = rp[t].out;
    for (int64_t i = 0; i < n; ++i) {  // branch-free: the kept share can be anything
      const float v = x[i];
      for (int p = 0; p < NP; ++p) c[p] += v >= f[p];
      out[j] = v;
      j += (v >= lo) & !(v >= hi);
    }
    std::copy(c, c + NP, rp[t].above);
    rp[t].kept = j;
  }
}

#if EPIC_CPU_AVX2
// kCompressLut[m]: the positions of the set bits of the 8-bit mask m, packed into the low bytes.
inline constexpr std::array<uint64_t, 256> kCompressLut = [] {
  std::array<uint64_t, 256> lut{};
  for (int m = 0; m < 256; ++m) {
    int j = 0;
    for (int b = 0; b < 8; ++b)
      if (m & (1 << b)) lut[m] |= uint64_t(b) << (8 * j++);
  }
  return lut;
}();

// Lane permutation that moves the lanes selected by mask m to the front.
EPIC_AVX2_FN inline __m256i compress_perm(unsigned m) {
  return _mm256_cvtepu8_epi32(_mm_cvtsi64_si128(static_cast<long long>(kCompressLut[m])));
}

// range_pass for NR (1 or 2) queries in one pass, n < 2^31: per 8 values NP compares per query
// and one compress-store. The 8-lane stores run up to 8 slots past the kept values.
template <int NR, int NP>
EPIC_AVX2_FN inline void range_pass_avx2(const float* x, int64_t n, RangePass<NP>* rp) {
  __m256 f[NR][NP], klo[NR], khi[NR];
  __m256i c[NR][NP];  // lane counters: a true compare is -1, so they count down
  int64_t j[NR];
  for (int t = 0; t < NR; ++t) {
    j[t] = 0;
    klo[t] = _mm256_set1_ps(rp[t].keep_lo), khi[t] = _mm256_set1_ps(rp[t].keep_hi);
    for (int p = 0; p < NP; ++p) f[t][p] = _mm256_set1_ps(rp[t].f[p]), c[t][p] = _mm256_setzero_si256();
  }
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 v = _mm256_loadu_ps(x + i);
    for (int t = 0; t < NR; ++t) {
      for (int p = 0; p < NP; ++p)
        c[t][p] = _mm256_add_epi32(c[t][p], _mm256_castps_si256(_mm256_cmp_ps(v, f[t][p], _CMP_GE_OQ)));
      const __m256 in = _mm256_andnot_ps(_mm256_cmp_ps(v, khi[t], _CMP_GE_OQ),
                                         _mm256_cmp_ps(v, klo[t], _CMP_GE_OQ));
      const unsigned m = _mm256_movemask_ps(in);
      const __m256i kept = _mm256_permutevar8x32_epi32(_mm256_castps_si256(v), compress_perm(m));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(rp[t].out + j[t]), kept);
      j[t] += _mm_popcnt_u32(m);
    }
  }
  for (int t = 0; t < NR; ++t) {
    RangePass<NP>& r = rp[t];
    for (int p = 0; p < NP; ++p) {
      alignas(32) int32_t lanes[8];
      _mm256_store_si256(reinterpret_cast<__m256i*>(lanes), c[t][p]);
      r.above[p] = 0;
      for (int l = 0; l < 8; ++l) r.above[p] -= lanes[l];
    }
    for (int64_t k = i; k < n; ++k) {
      const float v = x[k];
      for (int p = 0; p < NP; ++p) r.above[p] += v >= r.f[p];
      if (v >= r.keep_lo && !(v >= r.keep_hi)) r.out[j[t]++] = v;
    }
    r.kept = j[t];
  }
}

// AVX2 index compaction: out = ascending i with x[i] >= f, at most `room` written (8-lane
// stores only while 8 slots remain); returns the full count. n < 2^31.
EPIC_AVX2_FN inline int64_t emit_at_least_avx2(const float* x, int64_t n, float f, int64_t* out,
                                               int64_t room) {
  const __m256 fv = _mm256_set1_ps(f);
  int64_t i = 0, j = 0;
  for (; i + 8 <= n && j + 8 <= room; i += 8) {
    const unsigned m = _mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(x + i), fv, _CMP_GE_OQ));
    if (m == 0) continue;  // most blocks hold no kept value: skip the stores
    const __m256i pos = _mm256_add_epi32(compress_perm(m), _mm256_set1_epi32(static_cast<int32_t>(i)));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + j),
                        _mm256_cvtepi32_epi64(_mm256_castsi256_si128(pos)));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + j + 4),
                        _mm256_cvtepi32_epi64(_mm256_extracti128_si256(pos, 1)));
    j += _mm_popcnt_u32(m);
  }
  for (; i < n; ++i)
    if (x[i] >= f) {
      if (j < room) out[j] = i;
      ++j;
    }
  return j;
}

// Bitonic sort of the 8R keys held in R registers (lane l of register r is element 8r + l).
// Stage (k, j) compare-exchanges elements i and i ^ j, ascending where (i & k) == 0 (k: length
// of the runs being merged, j: distance). Distances below 8 pair lanes within a register
// (permute, min, max, blend); longer ones pair whole registers. Fully unrolled, every mask and
// permutation is a constant.
template <int R>
EPIC_AVX2_FN inline void bitonic_sort(__m256i* v) {
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  _Pragma("GCC unroll 8") for (int k = 2; k <= 8 * R; k *= 2) {
    _Pragma("GCC unroll 8") for (int j = k / 2; j >= 1; j /= 2) {
      if (j >= 8) {
        _Pragma("GCC unroll 8") for (int r = 0; r < R; ++r) {
          const int s = r ^ (j / 8);
          if (s < r) continue;
          const bool desc = ((8 * r) & k) != 0;
          const __m256i lo = _mm256_min_epi32(v[r], v[s]), hi = _mm256_max_epi32(v[r], v[s]);
          v[r] = desc ? hi : lo, v[s] = desc ? lo : hi;
        }
        continue;
      }
      const __m256i jv = _mm256_set1_epi32(j), kv = _mm256_set1_epi32(k);
      const __m256i partner = _mm256_xor_si256(lane, jv);
      const __m256i upper = _mm256_cmpeq_epi32(_mm256_and_si256(lane, jv), jv);
      _Pragma("GCC unroll 8") for (int r = 0; r < R; ++r) {
        // Descending runs: by lane for short runs, by register for runs of 8 and longer.
        const __m256i desc = k >= 8 ? _mm256_set1_epi32(((8 * r) & k) ? -1 : 0)
                                    : _mm256_cmpeq_epi32(_mm256_and_si256(lane, kv), kv);
        const __m256i p = _mm256_permutevar8x32_epi32(v[r], partner);
        v[r] = _mm256_blendv_epi8(_mm256_min_epi32(v[r], p), _mm256_max_epi32(v[r], p),
                                  _mm256_xor_si256(upper, desc));
      }
    }
  }
}

template <int R>
EPIC_AVX2_FN inline void bitonic_sort_keys(int32_t* a) {
  __m256i v[R];
  for (int r = 0; r < R; ++r) v[r] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a + 8 * r));
  bitonic_sort<R>(v);
  for (int r = 0; r < R; ++r) _mm256_storeu_si256(reinterpret_cast<__m256i*>(a + 8 * r), v[r]);
}
#endif

// Sort a[0..n) in place, n <= 32; a has room for 32 (the padding it gets is overwritten).
template <bool kAvx2>
inline void sort_small(int32_t* a, int64_t n) {
#if EPIC_CPU_AVX2
  if constexpr (kAvx2) {
    for (int64_t j = n; j < 32; ++j) a[j] = INT32_MAX;  // pads sort last (no score has that key)
    if (n <= 16) return bitonic_sort_keys<2>(a);
    return bitonic_sort_keys<4>(a);
  }
#endif
  for (int64_t i = 1; i < n; ++i) {  // insertion sort
    const int32_t v = a[i];
    int64_t j = i;
    for (; j > 0 && a[j - 1] > v; --j) a[j] = a[j - 1];
    a[j] = v;
  }
}

// A search pass (nr = 1 or 2 queries) with the best instruction set.
template <bool kAvx2, int NP>
inline void range_pass(const float* x, int64_t n, RangePass<NP>* rp, int nr) {
#if EPIC_CPU_AVX2
  if constexpr (kAvx2) {
    if (n < (int64_t(1) << 31)) {
      if (nr == 2) return range_pass_avx2<2, NP>(x, n, rp);
      return range_pass_avx2<1, NP>(x, n, rp);
    }
  }
#endif
  range_pass_scalar<NP>(x, n, rp, nr);
}

// out = ascending indices i with x[i] >= f (NaN never), at most `room` written; returns the
// full count.
template <bool kAvx2>
inline int64_t emit_at_least(const float* x, int64_t n, float f, int64_t* out, int64_t room) {
#if EPIC_CPU_AVX2
  if constexpr (kAvx2) {
    if (n < (int64_t(1) << 31)) return emit_at_least_avx2(x, n, f, out, room);
  }
#endif
  int64_t j = 0;
  if (room >= n) {
    for (int64_t i = 0; i < n; ++i) {  // branch-free: j <= i < n is always a slot
      out[j] = i;
      j += x[i] >= f;
    }
    return j;
  }
  for (int64_t i = 0; i < n; ++i)
    if (x[i] >= f) {
      if (j < room) out[j] = i;
      ++j;
    }
  return j;
}

// Indices (ascending) of the kk best of x[0..n) (0 < kk < n), given v = the key of rank n - kk:
// every score above v, then the lowest-index scores equal to v (NaN counts as equal to NaN
// here, as in float_key order). out has room for kk.
template <bool kAvx2>
inline void emit_top(const float* x, int64_t n, int64_t kk, int32_t v, int64_t* out) {
  const float fv = key_score(v);  // "key >= v" is "x >= fv" for a number (-0.0 == +0.0)
  // Usually v is unique among the kept scores and "key >= v" is the answer, in one compaction.
  if (v != kNanKey && emit_at_least<kAvx2>(x, n, fv, out, kk) == kk) return;
  int64_t greater = 0;
  for (int64_t i = 0; i < n; ++i) greater += v == kNanKey ? x[i] == x[i] : x[i] > fv;
  int64_t ties = kk - greater, j = 0;
  for (int64_t i = 0; i < n; ++i) {
    const float y = x[i];
    const bool above = v == kNanKey ? y == y : y > fv;
    const bool equal = v == kNanKey ? y != y : y == fv;
    if (above || (equal && ties-- > 0)) out[j++] = i;
  }
}

}  // namespace epic::cpu
