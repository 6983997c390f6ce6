// Shared helpers for every epic_ext kernel (CPU and CUDA).
// Float ordering keys and the IQR interpolation live here so that every backend ranks and
// thresholds scores with bit-identical arithmetic.
#pragma once

#include <cstdint>
#include <cstring>
#include <type_traits>

#if defined(__CUDACC__)
#define EPIC_HD __host__ __device__ __forceinline__
#else
#define EPIC_HD inline
#endif

namespace epic {

// Merge modes shared by the Python layer (epic_ext/ops.py keeps the same numbering).
enum MergeMode : int64_t { kMergeNone = 0, kMergeMean = 1, kMergeWeighted = 2 };
// KL reductions (epic_ext/kl.py keeps the same numbering).
enum Reduction : int64_t { kReduceNone = 0, kReduceSum = 1, kReduceMean = 2, kReduceBatchMean = 3 };

// Accumulation type for elements of type T: fp64 for fp64, fp32 for fp32 / fp16 / bf16.
template <typename T>
using acc_of = std::conditional_t<std::is_same_v<T, double>, double, float>;

EPIC_HD uint32_t float_bits(float x) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(x);
#else
  uint32_t u;
  std::memcpy(&u, &x, sizeof(u));
  return u;
#endif
}

EPIC_HD float bits_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float x;
  std::memcpy(&x, &u, sizeof(x));
  return x;
#endif
}

// Monotone map float -> uint32: a > b  <=>  key(a) > key(b). NaN maps to 0, below -inf
// (0x007FFFFF), so NaN ranks lowest; -0.0 is folded onto +0.0 so the two tie.
EPIC_HD uint32_t float_key(float x) {
  if (x != x) return 0u;
  if (x == 0.0f) x = 0.0f;
  const uint32_t u = float_bits(x);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

// Inverse of float_key for every key except 0 (NaN).
EPIC_HD float key_float(uint32_t key) {
  return bits_float((key & 0x80000000u) ? (key & 0x7FFFFFFFu) : ~key);
}

// Linear interpolation exactly as ATen's scalar lerp (used by torch.quantile):
// weight < 0.5 -> lo + w (hi - lo), else hi - (hi - lo) (1 - w). Every operation is rounded
// on its own (the build disables FMA contraction) so all backends agree bit for bit.
EPIC_HD float quantile_lerp(float lo, float hi, float w) {
#if defined(__CUDA_ARCH__)
  const float diff = __fsub_rn(hi, lo);
  return (w < 0.5f) ? __fadd_rn(lo, __fmul_rn(w, diff))
                    : __fsub_rn(hi, __fmul_rn(diff, __fsub_rn(1.0f, w)));
#else
  const float diff = hi - lo;
  return (w < 0.5f) ? lo + w * diff : hi - diff * (1.0f - w);
#endif
}

// Upper IQR fence q3 + whisker (q3 - q1), each step rounded to fp32.
EPIC_HD float iqr_fence(float q1, float q3, float whisker) {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(q3, __fmul_rn(whisker, __fsub_rn(q3, q1)));
#else
  return q3 + whisker * (q3 - q1);
#endif
}

// Position of quantile q among n sorted values: rank = q * (n - 1) in fp32, as torch.quantile
// computes it; returns floor and the interpolation weight.
EPIC_HD void quantile_rank(float q, int64_t n, int64_t* below, float* weight) {
#if defined(__CUDA_ARCH__)
  const float rank = __fmul_rn(q, static_cast<float>(n - 1));
#else
  const float rank = q * static_cast<float>(n - 1);
#endif
  const int64_t b = static_cast<int64_t>(rank);
  *below = b;
  *weight = rank - static_cast<float>(b);
}

}  // namespace epic
