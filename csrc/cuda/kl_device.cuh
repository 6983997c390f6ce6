// Device building blocks of the fused teacher-student KL kernel (csrc/cuda/kl_div.cu): raw 16-byte
// loads / stores of logits and their conversion to the accumulation type, the per-row online
// state of one softmax pair, its rescaling to larger maxima, the pairwise merge used by the warp
// and block reductions, and the exponential in the kernel's units.
//
// Notation: a row has a "target" side P (the teacher for forward KL(p_t || p_s), the student for
// reverse KL(p_s || p_t)) and an "other" side Q. Logits are kept raw (not divided by tau); with
// c = log2(e) / tau (fp32, exponents in base 2) or c = 1 / tau (fp64, natural exponents):
//   zp = sum_v 2^((P_v - mp) c)            mp = max_v P_v
//   zq = sum_v 2^((Q_v - mq) c)            mq = max_v Q_v
//   s  = sum_v ep_v ((P_v - mp) - (Q_v - qa))   over entries with ep_v > 0 (no mass, no term)
// where qa ("anchor") is Q at the argmax of P (the largest such Q on ties). Then
//   KL(P || Q) = (s / zp + (mq - qa)) / tau + ln(zq / zp).
// Taking the log-ratio relative to (mp, qa) rather than (mp, mq) makes the anchor entry's term
// exactly 0 whatever partition of the row found it, so a one-hot target gives s = 0 exactly, and
// the terms stay small when teacher and student agree.
//
// When a partial state moves to larger maxima (mp', mq') and anchor qa', every ep_v is multiplied
// by r = 2^((mp - mp') c) and every log-ratio gains delta = (mp - mp') - (qa - qa'), so
//   zp' = r zp,   s' = r s + delta zp',   zq' = 2^((mq - mq') c) zq.
// A side whose maximum is still -inf has no mass (z = 0, s = 0); -inf maxima and anchors are
// replaced by 0 ("safe") wherever they would be subtracted, so no inf - inf appears. If the anchor
// itself is -inf (target mass where the other side has none), its term is +inf and s stays +inf,
// which is the right KL; when r underflows to 0 the old terms vanish, as their exponentials would.
// A NaN or +inf logit makes its side's z NaN (2^NaN, 2^(inf - inf)), and NaN survives every
// rescale and merge; a side of only -inf logits keeps z = 0: kl_div.cu tests the final z of both
// sides to give such an undefined row its NaN loss and NaN gradient row.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "device_common.cuh"
#include "reduce.cuh"

namespace epic::cuda::kl {

// ---- logits in and out: VEC logits of type T as the raw bits of one load / store (16 bytes for
// the vector path, one logit for the scalar path), unpacked straight from 32-bit words.

template <typename T, int VEC>
struct Io {
  using R = typename RawOf<static_cast<int>(sizeof(T)) * VEC>::type;
  static __device__ __forceinline__ R load(const T* p) { return *reinterpret_cast<const R*>(p); }
  // Last read of a row (evict-first) and gradient store (streaming): neither is read again.
  static __device__ __forceinline__ R load_last(const T* p) {
    return __ldcs(reinterpret_cast<const R*>(p));
  }
  static __device__ __forceinline__ void store(T* p, R r) { __stcs(reinterpret_cast<R*>(p), r); }
};

// Conv<T>::unpack(raw, out[VEC]) / pack(in[VEC]) -> raw; rounding to nearest even, as the CPU's
// static_cast to the logits' dtype.
template <typename T>
struct Conv;

template <>
struct Conv<c10::BFloat16> {
  static __device__ __forceinline__ void unpack(const uint4& r, float (&o)[8]) {
    unpack8<c10::BFloat16>(r, o);
  }
  static __device__ __forceinline__ void unpack(unsigned short r, float (&o)[1]) {
    o[0] = __uint_as_float(static_cast<uint32_t>(r) << 16);
  }
  static __device__ __forceinline__ uint32_t pack2(float lo, float hi) {
    const __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
    uint32_t u;
    memcpy(&u, &h, sizeof(u));
    return u;
  }
  static __device__ __forceinline__ uint4 pack(const float (&v)[8]) {
    return {pack2(v[0], v[1]), pack2(v[2], v[3]), pack2(v[4], v[5]), pack2(v[6], v[7])};
  }
  static __device__ __forceinline__ unsigned short pack(const float (&v)[1]) {
    return __bfloat16_as_ushort(__float2bfloat16_rn(v[0]));
  }
  template <typename F>
  static __device__ __forceinline__ uint32_t map2(uint32_t s, uint32_t t, F f) {
    return pack2(f(__uint_as_float(s << 16), __uint_as_float(t << 16)),
                 f(__uint_as_float(s & 0xFFFF0000u), __uint_as_float(t & 0xFFFF0000u)));
  }
};

template <>
struct Conv<c10::Half> {
  static __device__ __forceinline__ void unpack(const uint4& r, float (&o)[8]) {
    unpack8<c10::Half>(r, o);
  }
  static __device__ __forceinline__ void unpack(unsigned short r, float (&o)[1]) {
    o[0] = __half2float(__ushort_as_half(r));
  }
  static __device__ __forceinline__ uint32_t pack2(float lo, float hi) {
    const __half2 h = __floats2half2_rn(lo, hi);
    uint32_t u;
    memcpy(&u, &h, sizeof(u));
    return u;
  }
  static __device__ __forceinline__ uint4 pack(const float (&v)[8]) {
    return {pack2(v[0], v[1]), pack2(v[2], v[3]), pack2(v[4], v[5]), pack2(v[6], v[7])};
  }
  static __device__ __forceinline__ unsigned short pack(const float (&v)[1]) {
    return __half_as_ushort(__float2half_rn(v[0]));
  }
  template <typename F>
  static __device__ __forceinline__ uint32_t map2(uint32_t s, uint32_t t, F f) {
    __half2 hs, ht;
    memcpy(&hs, &s, sizeof(hs));
    memcpy(&ht, &t, sizeof(ht));
    const float2 fs = __half22float2(hs), ft = __half22float2(ht);
    return pack2(f(fs.x, ft.x), f(fs.y, ft.y));
  }
};

template <>
struct Conv<float> {
  static __device__ __forceinline__ void unpack(const uint4& r, float (&o)[4]) {
    o[0] = __uint_as_float(r.x);
    o[1] = __uint_as_float(r.y);
    o[2] = __uint_as_float(r.z);
    o[3] = __uint_as_float(r.w);
  }
  static __device__ __forceinline__ void unpack(unsigned int r, float (&o)[1]) {
    o[0] = __uint_as_float(r);
  }
  static __device__ __forceinline__ uint4 pack(const float (&v)[4]) {
    return {__float_as_uint(v[0]), __float_as_uint(v[1]), __float_as_uint(v[2]),
            __float_as_uint(v[3])};
  }
  static __device__ __forceinline__ unsigned int pack(const float (&v)[1]) {
    return __float_as_uint(v[0]);
  }
};

template <>
struct Conv<double> {
  static __device__ __forceinline__ uint32_t lo(double v) {
    return static_cast<uint32_t>(__double2loint(v));
  }
  static __device__ __forceinline__ uint32_t hi(double v) {
    return static_cast<uint32_t>(__double2hiint(v));
  }
  static __device__ __forceinline__ void unpack(const uint4& r, double (&o)[2]) {
    o[0] = __hiloint2double(static_cast<int>(r.y), static_cast<int>(r.x));
    o[1] = __hiloint2double(static_cast<int>(r.w), static_cast<int>(r.z));
  }
  static __device__ __forceinline__ void unpack(const uint2& r, double (&o)[1]) {
    o[0] = __hiloint2double(static_cast<int>(r.y), static_cast<int>(r.x));
  }
  static __device__ __forceinline__ uint4 pack(const double (&v)[2]) {
    return {lo(v[0]), hi(v[0]), lo(v[1]), hi(v[1])};
  }
  static __device__ __forceinline__ uint2 pack(const double (&v)[1]) {
    return {lo(v[0]), hi(v[0])};
  }
};

// ---- the online state

template <typename V>
__device__ __forceinline__ V neg_inf();
template <>
__device__ __forceinline__ float neg_inf<float>() {
  return __int_as_float(static_cast<int>(0xFF800000u));
}
template <>
__device__ __forceinline__ double neg_inf<double>() {
  return __longlong_as_double(static_cast<long long>(0xFFF0000000000000ull));
}

template <typename V>
__device__ __forceinline__ V quiet_nan();
template <>
__device__ __forceinline__ float quiet_nan<float>() {
  return __int_as_float(0x7FC00000);
}
template <>
__device__ __forceinline__ double quiet_nan<double>() {
  return __longlong_as_double(0x7FF8000000000000ll);
}

__device__ __forceinline__ float vmax(float a, float b) { return fmaxf(a, b); }
__device__ __forceinline__ double vmax(double a, double b) { return fmax(a, b); }
__device__ __forceinline__ float vfma(float a, float b, float c) { return fmaf(a, b, c); }
__device__ __forceinline__ double vfma(double a, double b, double c) { return fma(a, b, c); }

// -inf -> 0: the shift applied when a side has no finite entry yet.
template <typename V>
__device__ __forceinline__ V safe(V m) {
  return m == neg_inf<V>() ? V(0) : m;
}

// Exponential in the kernel's units, per accumulation type (fp32 for fp32/fp16/bf16 logits).
template <typename A>
struct Math;

template <>
struct Math<float> {
  static constexpr double kUnit = 1.4426950408889634;  // log2(e): exponents in base 2
  // 2^x, MUFU.EX2: relative error ~2^-22, 2^(-inf) = 0, results below 2^-126 flush to 0.
  static __device__ __forceinline__ float ex(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
  }
  // Block stage (fp64 sums): the same MUFU.EX2 for the rescale factors, widened; an fp64 exp2
  // would be ~40 dependent instructions per factor for no accuracy the fp32 partials carry.
  static __device__ __forceinline__ double ex(double x) {
    return static_cast<double>(ex(static_cast<float>(x)));
  }
};

template <>
struct Math<double> {
  static constexpr double kUnit = 1.0;
  static __device__ __forceinline__ double ex(double x) { return exp(x); }
};

// Online state of one (part of a) row; see the header comment.
template <typename V>
struct State {
  V mp, zp, mq, zq, qa, s;
};

template <typename V>
__device__ __forceinline__ State<V> empty_state() {
  return {neg_inf<V>(), V(0), neg_inf<V>(), V(0), neg_inf<V>(), V(0)};
}

template <typename V, typename W>
__device__ __forceinline__ State<V> convert_state(const State<W>& x) {
  return {static_cast<V>(x.mp), static_cast<V>(x.zp), static_cast<V>(x.mq),
          static_cast<V>(x.zq), static_cast<V>(x.qa), static_cast<V>(x.s)};
}

// Moves x to maxima mp >= x.mp, mq >= x.mq and anchor qa (the anchor of the entry at mp).
template <typename M, typename V>
__device__ __forceinline__ void rescale(State<V>& x, V mp, V mq, V qa, V c) {
  if (x.mp != neg_inf<V>()) {
    const V dp = x.mp - mp;  // <= 0, finite
    const V r = M::ex(dp * c);
    x.zp = mul_rn(x.zp, r);
    // delta is finite: both maxima finite, anchors made safe. s = +inf stays +inf while r > 0.
    x.s = r > V(0) ? vfma(r, x.s, (dp - (safe(x.qa) - safe(qa))) * x.zp) : V(0);
  }
  if (x.mq != neg_inf<V>()) x.zq = mul_rn(x.zq, M::ex((x.mq - mq) * c));
  x.mp = mp;
  x.mq = mq;
  x.qa = qa;
}

// Anchor of the union of two parts: the anchor of the part holding the larger P maximum, the
// larger anchor on a tie (symmetric, so both lanes of a butterfly pick the same one).
template <typename V>
__device__ __forceinline__ V merged_anchor(V mpa, V qaa, V mpb, V qab) {
  return mpa == mpb ? vmax(qaa, qab) : (mpa > mpb ? qaa : qab);
}

template <typename M, typename V>
__device__ __forceinline__ State<V> merge(State<V> a, State<V> b, V c) {
  const V mp = vmax(a.mp, b.mp), mq = vmax(a.mq, b.mq);
  const V qa = merged_anchor(a.mp, a.qa, b.mp, b.qa);
  if (a.mp != mp || a.mq != mq || a.qa != qa) rescale<M>(a, mp, mq, qa, c);
  if (b.mp != mp || b.mq != mq || b.qa != qa) rescale<M>(b, mp, mq, qa, c);
  return {mp, a.zp + b.zp, mq, a.zq + b.zq, qa, a.s + b.s};
}

// The whole state of lane (this lane ^ offset), for cuda::warp_reduce.
template <typename V>
__device__ __forceinline__ State<V> shfl_xor(const State<V>& x, int offset, unsigned mask) {
  return {__shfl_xor_sync(mask, x.mp, offset), __shfl_xor_sync(mask, x.zp, offset),
          __shfl_xor_sync(mask, x.mq, offset), __shfl_xor_sync(mask, x.zq, offset),
          __shfl_xor_sync(mask, x.qa, offset), __shfl_xor_sync(mask, x.s, offset)};
}

template <typename V>
__device__ __forceinline__ State<V> shfl_state(const State<V>& x, int lane) {
  return {__shfl_sync(kFullMask, x.mp, lane), __shfl_sync(kFullMask, x.zp, lane),
          __shfl_sync(kFullMask, x.mq, lane), __shfl_sync(kFullMask, x.zq, lane),
          __shfl_sync(kFullMask, x.qa, lane), __shfl_sync(kFullMask, x.s, lane)};
}

// merge as the op of cuda::warp_reduce: the own state first, the partner lane's second.
template <typename M, typename V>
struct Merge {
  V c;
  __device__ __forceinline__ State<V> operator()(const State<V>& a, const State<V>& b) const {
    return merge<M>(a, b, c);
  }
};

// Butterfly merge over the lanes [0, width) of each aligned group of `width` lanes (a power of
// two <= 32, every lane of the warp calling). The tree is fixed, so the result is deterministic;
// lanes may differ in the last bit (FMA contraction is not symmetric), so callers use one lane's.
template <typename M, typename V>
__device__ __forceinline__ State<V> butterfly(State<V> x, V c, int width) {
  return warp_reduce(x, width, Merge<M, V>{c});
}

// Moves st to the maxima and anchor of st plus the N entries p[], q[] (gp, gq: their maxima).
// Kept out of the common path: after the first entries of a row it is rarely needed.
template <typename M, typename A, int N>
__device__ __forceinline__ void raise_maxima(State<A>& st, const A (&p)[N], const A (&q)[N],
                                             A gp, A gq, A c) {
  A mp = st.mp, qa = st.qa;
  if (gp >= st.mp) {  // new or tied maximum of P: its anchor is the largest Q among the ties
    A ga = neg_inf<A>();
#pragma unroll
    for (int k = 0; k < N; ++k)
      if (p[k] == gp) ga = vmax(ga, q[k]);
    qa = gp > st.mp ? ga : vmax(st.qa, ga);
    mp = gp;
  }
  const A mq = vmax(st.mq, gq);
  if (mp != st.mp || mq != st.mq || qa != st.qa) rescale<M>(st, mp, mq, qa, c);
}

// Adds N entries (P values p[], Q values q[]) to a thread's state: one rescale when they raise a
// maximum or tie the finite P maximum, then their sums relative to the (updated) state.
template <typename M, typename A, int N>
__device__ __forceinline__ void accumulate(State<A>& st, const A (&p)[N], const A (&q)[N], A c) {
  A gp = p[0], gq = q[0];
#pragma unroll
  for (int k = 1; k < N; ++k) {
    gp = vmax(gp, p[k]);
    gq = vmax(gq, q[k]);
  }
  // (entries that are all -inf on the P side never move the anchor: it only matters with mass)
  if (__builtin_expect((gp >= st.mp && gp != neg_inf<A>()) || gq > st.mq, 0))
    raise_maxima<M>(st, p, q, gp, gq, c);
  const A sp = safe(st.mp), sq = safe(st.mq), sa = safe(st.qa);
  A zp = A(0), zq = A(0), s = A(0);
#pragma unroll
  for (int k = 0; k < N; ++k) {
    const A up = p[k] - sp, uq = q[k] - sq;  // up = -inf for a -inf logit
    const A ep = M::ex(up * c), eq = M::ex(uq * c);
    zp = k == 0 ? ep : zp + ep;
    zq = k == 0 ? eq : zq + eq;
    const A d = up - (q[k] - sa);
    s = vfma(ep, ep > A(0) ? d : A(0), s);  // no mass, no term (never 0 * inf)
  }
  st.zp += zp;
  st.zq += zq;
  st.s += s;
}

}  // namespace epic::cuda::kl
