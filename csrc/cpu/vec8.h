// Eight fp32 lanes as a GCC vector (one ymm register in an AVX2 clone, two xmm otherwise), with
// the loads of fp32 / bf16 / fp16 storage and a polynomial exp. Every helper is force-inlined:
// an AVX2 clone and the default code pass 32-byte vectors differently (ymm register vs memory),
// so no call may cross that boundary; callers wrap their loops in a
// __attribute__((target_clones("avx2", "default"))) function. Used by attn_scores.cpp and
// kl_div.cpp.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>

namespace epic::cpu::vec8 {

using v8f = float __attribute__((vector_size(32)));
using v8i = int32_t __attribute__((vector_size(32)));
using v8u16 = uint16_t __attribute__((vector_size(16)));
constexpr int kLanes = 8;

#ifndef EPIC_VEC_INLINE
#define EPIC_VEC_INLINE __attribute__((always_inline)) inline
#endif

EPIC_VEC_INLINE v8f splat(float x) { return v8f{} + x; }

// exp(x) on 8 lanes, relative error ~2 ulp on [-87, 88]; 0 below (incl. -inf), inf above.
EPIC_VEC_INLINE v8f exp8(v8f x) {
  const v8f lo = splat(-87.0f), hi = splat(88.0f);
  v8f xc = x < lo ? lo : x;
  xc = xc > hi ? hi : xc;
  const v8f t = xc * 1.44269504088896341f;
  const v8i ni = __builtin_convertvector(t + (t >= 0.0f ? splat(0.5f) : splat(-0.5f)), v8i);
  const v8f n = __builtin_convertvector(ni, v8f);
  v8f r = xc - n * 0.693359375f;  // ln2 split in two so that n * ln2 is exact
  r = r - n * (-2.12194440e-4f);
  v8f p = splat(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * (r * r) + r + 1.0f;
  const v8f y = p * reinterpret_cast<v8f>((ni + 127) << 23);
  const v8f inf = splat(std::numeric_limits<float>::infinity());
  return x < lo ? splat(0.0f) : (x > hi ? inf : y);
}

EPIC_VEC_INLINE float exp1(float x) { return exp8(splat(x))[0]; }  // same arithmetic

EPIC_VEC_INLINE v8f load8(const float* p) {
  v8f v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
EPIC_VEC_INLINE v8f load8(const c10::BFloat16* p) {
  v8u16 h;
  std::memcpy(&h, p, sizeof(h));
  return reinterpret_cast<v8f>(__builtin_convertvector(h, v8i) << 16);
}
// fp16 -> fp32 without F16C: the exponent and mantissa shifted into fp32 position and scaled by
// 2^112 (exact for normal and subnormal halves), inf / NaN mapped to the fp32 all-ones exponent.
EPIC_VEC_INLINE v8f load8(const c10::Half* p) {
  v8u16 h;
  std::memcpy(&h, p, sizeof(h));
  const v8i w = __builtin_convertvector(h, v8i);
  const v8i em = w & 0x7FFF, sign = (w & 0x8000) << 16;
  const v8f finite = reinterpret_cast<v8f>(em << 13) * 0x1p112f;
  const v8i bits = em >= 0x7C00 ? ((em << 13) | 0x7F800000) : reinterpret_cast<v8i>(finite);
  return reinterpret_cast<v8f>(bits | sign);
}

EPIC_VEC_INLINE void store8(float* p, v8f v) { std::memcpy(p, &v, sizeof(v)); }

EPIC_VEC_INLINE float hsum(v8f v) {
  return ((v[0] + v[4]) + (v[2] + v[6])) + ((v[1] + v[5]) + (v[3] + v[7]));
}
EPIC_VEC_INLINE float hmax(v8f v) {
  float m = v[0];
  for (int j = 1; j < kLanes; ++j) m = std::max(m, v[j]);
  return m;
}

}  // namespace epic::cpu::vec8
