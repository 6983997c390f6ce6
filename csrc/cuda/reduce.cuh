// Warp and block reductions shared by csrc/cuda/*: the xor butterfly over the lanes of a warp (or
// of an aligned group of lanes), the block sum built on it, and the merge of online softmax
// partials. Every reduction adds in a fixed order, so results are deterministic for a given
// launch shape.
#pragma once

#include <cuda_runtime.h>

#include <cmath>

namespace epic::cuda {

constexpr unsigned kFullMask = 0xFFFFFFFFu;

// The value of lane (this lane ^ offset). Overloaded next to structs that reduce as a whole
// (kl::State): warp_reduce_each finds those overloads by argument-dependent lookup.
template <typename T>
__device__ __forceinline__ T shfl_xor(T v, int offset, unsigned mask) {
  return __shfl_xor_sync(mask, v, offset);
}

struct Sum {
  template <typename T>
  __device__ __forceinline__ T operator()(T a, T b) const {
    return a + b;
  }
};

// x[i] = op(x[i], x[i] of lane ^ o) for o = width / 2, ..., 1 and every i < n (n uniform): each
// aligned group of `width` lanes (a power of two <= 32) ends with the reduction of the group in
// every lane. `mask` names the calling lanes (whole groups). One step shuffles all n values, so
// their latencies overlap. Lanes may differ in the last bit when op is not symmetric.
template <typename T, int N, typename Op>
__device__ __forceinline__ void warp_reduce_each(T (&x)[N], int n, int width, Op op,
                                                 unsigned mask = kFullMask) {
  for (int o = width >> 1; o > 0; o >>= 1) {
#pragma unroll
    for (int i = 0; i < N; ++i)
      if (i < n) x[i] = op(x[i], shfl_xor(x[i], o, mask));
  }
}

template <typename T, typename Op>
__device__ __forceinline__ T warp_reduce(T x, int width, Op op, unsigned mask = kFullMask) {
  T one[1] = {x};
  warp_reduce_each(one, 1, width, op, mask);
  return one[0];
}

// Sum over the block (blockDim.x a multiple of 32, red: blockDim.x / 32 entries in shared memory):
// each warp's butterfly sum, then the warps' sums added in warp order; every thread gets the
// total. Ends on a barrier so `red` is reusable at once.
template <typename T>
__device__ __forceinline__ T block_sum(T v, T* red) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
  v = warp_reduce(v, 32, Sum{});
  if (lane == 0) red[warp] = v;
  __syncthreads();
  T t = 0;
  for (int w = 0; w < nw; ++w) t += red[w];
  __syncthreads();
  return t;
}

// Online softmax partial: max m of some scores and z = sum exp(score - m) (m = -inf: no score).
struct MaxSumExp {
  float m, z;
};

// Merges n partials in order: m[i * stride], z[i * stride] are part i's. The overall max first,
// then z exp(m - max) summed over the parts that have scores.
template <typename Stride>
__device__ __forceinline__ MaxSumExp merge_max_sumexp(const float* m, const float* z, int n,
                                                      Stride stride) {
  float M = -INFINITY;
  for (int i = 0; i < n; ++i) M = fmaxf(M, m[i * stride]);
  float Z = 0.0f;
  if (M != -INFINITY)
    for (int i = 0; i < n; ++i) {
      const float mi = m[i * stride];
      if (mi != -INFINITY) Z += z[i * stride] * expf(mi - M);
    }
  return {M, Z};
}

}  // namespace epic::cuda
