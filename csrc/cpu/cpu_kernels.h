// Row-level building blocks of the CPU kernels, shared by select.cpp and gather_merge.cpp.
#pragma once

#include <ATen/ATen.h>
#include <algorithm>
#include <cstdint>
#include <functional>
#include <vector>

#include "epic/common.h"

namespace epic::cpu {

// Fill keys[i] = float_key(row[i * stride]) for one score row.
template <typename T>
inline void row_keys(const T* row, int64_t stride, int64_t n, uint32_t* keys) {
  for (int64_t i = 0; i < n; ++i) keys[i] = float_key(static_cast<float>(row[i * stride]));
}

// Indices of the k largest keys in ascending index order; ties go to the lower index.
// `scratch` holds n uint32. O(n) with nth_element.
inline void select_top_keys(const uint32_t* keys, int64_t n, int64_t k, uint32_t* scratch,
                            int64_t* out) {
  if (k <= 0) return;
  if (k >= n) {
    for (int64_t i = 0; i < n; ++i) out[i] = i;
    return;
  }
  std::copy(keys, keys + n, scratch);
  std::nth_element(scratch, scratch + (k - 1), scratch + n, std::greater<uint32_t>());
  const uint32_t kth = scratch[k - 1];
  int64_t greater = 0;
  for (int64_t i = 0; i < n; ++i) greater += keys[i] > kth;
  int64_t ties_left = k - greater;
  int64_t j = 0;
  for (int64_t i = 0; i < n; ++i) {
    const uint32_t key = keys[i];
    if (key > kth || (key == kth && ties_left-- > 0)) out[j++] = i;
  }
}

// Upper IQR fence of the finite-or-infinite (non-NaN) values in v[0..n), which is reordered.
// Returns NaN when n == 0 (no value is then an outlier).
inline float upper_fence(float* v, int64_t n, float whisker) {
  if (n == 0) return bits_float(0x7FC00000u);
  float q[2];
  const float qs[2] = {0.25f, 0.75f};
  for (int t = 0; t < 2; ++t) {
    int64_t below;
    float w;
    quantile_rank(qs[t], n, &below, &w);
    std::nth_element(v, v + below, v + n);
    const float lo = v[below];
    // torch.quantile reads the value at ceil(rank): the next order statistic only when w > 0.
    const float hi = (w > 0.0f) ? *std::min_element(v + below + 1, v + n) : lo;
    q[t] = quantile_lerp(lo, hi, w);
  }
  return iqr_fence(q[0], q[1], whisker);
}

}  // namespace epic::cpu
