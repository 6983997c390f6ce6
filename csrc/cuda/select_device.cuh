// Device building blocks shared by csrc/cuda/*.cu: block-wide radix select over float_key keys,
// emission of the selected indices in spatial order (tie rule: lower index first), 16-byte vector
// loads/stores, and the host-side shared-memory check.
//
// Keys are the 32-bit float_key of common.h: a larger key ranks higher, NaN is key 0 (lowest), so
// "the k-th largest key" and "the r-th smallest non-NaN value" are the same search.
#pragma once

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/util/Exception.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <cstring>

#include "device_common.cuh"
#include "epic/common.h"
#include "reduce.cuh"

namespace epic::cuda {

// Shared scratch of the selection steps. The histogram is double-buffered so that a pass can clear
// the next pass's buffer before its first barrier (one barrier fewer per pass).
template <int MAXS>
struct SelectSmem {
  uint32_t hist[2][MAXS][256];
  uint32_t prefix[MAXS], krem[MAXS], greater[MAXS];
  uint32_t scan[2][2][32];  // emission: [buffer][greater / equal][warp]
  uint32_t red[32];         // block_sum
};

// One warp finds the digit of the kr-th largest candidate (1-based) in a 256-bin histogram: lane l
// holds bins [8l, 8l+8) in c[]. The single lane whose bins contain it returns true with the digit
// and `cum`, the number of candidates in higher bins.
__device__ __forceinline__ bool warp_pick_digit(const uint32_t (&c)[8], uint32_t kr, int lane,
                                                uint32_t* digit, uint32_t* cum) {
  uint32_t tot = 0;
#pragma unroll
  for (int j = 0; j < 8; ++j) tot += c[j];
  uint32_t suf = tot;  // candidates in lanes >= this one
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const uint32_t t = __shfl_down_sync(kFullMask, suf, o);
    if (lane + o < 32) suf += t;
  }
  const uint32_t above = suf - tot;
  if (!(above < kr && kr <= suf)) return false;
  uint32_t acc = above;
  uint32_t d = 0;
#pragma unroll
  for (int j = 7; j >= 0; --j) {
    if (acc + c[j] >= kr) {
      d = static_cast<uint32_t>(j);
      break;
    }
    acc += c[j];
  }
  *digit = static_cast<uint32_t>(lane) * 8u + d;
  *cum = acc;
  return true;
}

// For each of S targets, the key T[s] of descending rank k[s] among keys[0..n) (1 = largest), i.e.
// #(key > T) < k <= #(key >= T), and greater[s] = #(key > T[s]). Needs 1 <= k[s] <= n and
// blockDim.x >= 32 * S. Four passes of 8-bit histograms over the keys that still match the prefix
// found so far; targets that share a prefix share one histogram. Every thread gets the results.
template <int S, int MAXS>
__device__ void block_radix_select(const uint32_t* keys, int n, const uint32_t (&k)[S],
                                   SelectSmem<MAXS>& sm, uint32_t (&T)[S], uint32_t (&greater)[S]) {
  static_assert(S <= MAXS, "too many targets for the scratch");
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
#pragma unroll
  for (int s = 0; s < S; ++s)
    if (tid == s) {
      sm.prefix[s] = 0;
      sm.krem[s] = k[s];
      sm.greater[s] = 0;
    }
  for (int t = tid; t < S * 256; t += blockDim.x) (&sm.hist[0][0][0])[t] = 0;
  __syncthreads();
#pragma unroll 1
  for (int pass = 0; pass < 4; ++pass) {
    const int shift = 24 - 8 * pass;
    const uint32_t mask = pass == 0 ? 0u : (0xFFFFFFFFu << (shift + 8));
    uint32_t(*h)[256] = sm.hist[pass & 1];
    uint32_t pre[S];
    int src[S];
#pragma unroll
    for (int s = 0; s < S; ++s) pre[s] = sm.prefix[s];
#pragma unroll
    for (int s = 0; s < S; ++s) {
      src[s] = s;
      for (int t = s - 1; t >= 0; --t)
        if (pre[t] == pre[s]) src[s] = t;  // lowest target with the same prefix
    }
    for (int i = tid; i < n; i += blockDim.x) {
      const uint32_t key = keys[i];
      const uint32_t digit = (key >> shift) & 0xFFu;
#pragma unroll
      for (int s = 0; s < S; ++s)
        if (src[s] == s && (key & mask) == pre[s]) atomicAdd(&h[s][digit], 1u);
    }
    uint32_t* next = &sm.hist[(pass + 1) & 1][0][0];  // last read before the previous barrier
    for (int t = tid; t < S * 256; t += blockDim.x) next[t] = 0;
    __syncthreads();
    if (warp < S) {
      int my_src = 0;  // src[warp] and pre[warp] without dynamic indexing (local memory)
      uint32_t my_pre = 0;
#pragma unroll
      for (int s = 0; s < S; ++s)
        if (s == warp) {
          my_src = src[s];
          my_pre = pre[s];
        }
      const uint32_t* hs = h[my_src];
      uint32_t c[8];
#pragma unroll
      for (int j = 0; j < 8; ++j) c[j] = hs[lane * 8 + j];
      const uint32_t kr = sm.krem[warp];
      __syncwarp();  // every lane has read krem before one lane rewrites it
      uint32_t digit, cum;
      if (warp_pick_digit(c, kr, lane, &digit, &cum)) {
        sm.prefix[warp] = my_pre | (digit << shift);
        sm.greater[warp] += cum;
        sm.krem[warp] = kr - cum;
      }
    }
    __syncthreads();
  }
#pragma unroll
  for (int s = 0; s < S; ++s) {
    T[s] = sm.prefix[s];
    greater[s] = sm.greater[s];
  }
  __syncthreads();  // a following call may reset the scratch
}

// Where block_emit cuts to keep the top k keys: T, the k-th largest key, and ties, the keys equal
// to T that are kept (lower indices first).
struct TopkCut {
  uint32_t T, ties;
};

// The cut for the top k of keys[0..n) (k <= n; k uniform over the block). k == 0 keeps nothing:
// no key exceeds or ties 0xFFFFFFFF (above the key of +inf).
template <int MAXS>
__device__ __forceinline__ TopkCut block_topk_cut(const uint32_t* keys, int n, uint32_t k,
                                                  SelectSmem<MAXS>& sm) {
  TopkCut cut{0xFFFFFFFFu, 0u};
  if (k > 0) {
    const uint32_t kk[1] = {k};
    uint32_t T[1], greater[1];
    block_radix_select<1>(keys, n, kk, sm, T, greater);
    cut.T = T[0];
    cut.ties = k - greater[0];
  }
  return cut;
}

// Walks keys[0..n) in index order, one tile of blockDim.x keys at a time, and calls emit(i, pos)
// for every selected i: key > T, or key == T for the first `ties` such keys (lower index wins).
// pos = number of selected keys before i, so emitted positions are in ascending index order.
// If bits is not null, bits[w] gets the selection mask of keys [32w, 32w + 32), for every w.
// emit may overwrite keys[pos] (pos <= i, and keys of a tile are read before its barrier).
// No barrier after the last tile: callers sync before reading what emit wrote.
template <int MAXS, typename Emit>
__device__ void block_emit(const uint32_t* keys, int n, uint32_t T, uint32_t ties,
                           SelectSmem<MAXS>& sm, uint32_t* bits, Emit emit) {
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, nw = blockDim.x >> 5;
  const uint32_t below_lane = (1u << lane) - 1u;
  uint32_t carry_gt = 0, carry_eq = 0;
  int buf = 0;
  for (int base = 0; base < n; base += blockDim.x, buf ^= 1) {
    const int i = base + tid;
    const uint32_t key = i < n ? keys[i] : 0u;
    const bool gt = i < n && key > T;
    const bool eq = i < n && key == T;
    const uint32_t bgt = __ballot_sync(kFullMask, gt), beq = __ballot_sync(kFullMask, eq);
    if (lane == 0) {
      sm.scan[buf][0][warp] = __popc(bgt);
      sm.scan[buf][1][warp] = __popc(beq);
    }
    __syncthreads();  // double-buffered scan: the tile after next rewrites this buffer
    uint32_t wgt = 0, weq = 0, tgt = 0, teq = 0;
    for (int w = 0; w < nw; ++w) {
      const uint32_t a = sm.scan[buf][0][w], e = sm.scan[buf][1][w];
      if (w < warp) {
        wgt += a;
        weq += e;
      }
      tgt += a;
      teq += e;
    }
    const uint32_t gt_before = carry_gt + wgt + __popc(bgt & below_lane);
    const uint32_t eq_before = carry_eq + weq + __popc(beq & below_lane);
    const bool sel = gt || (eq && eq_before < ties);
    if (bits != nullptr) {
      const uint32_t bsel = __ballot_sync(kFullMask, sel);
      if (lane == 0 && base + warp * 32 < n) bits[(base >> 5) + warp] = bsel;
    }
    // Selected equal keys are the first `ties` ones, so min(eq_before, ties) of them precede i.
    if (sel) emit(i, gt_before + min(eq_before, ties));
    carry_gt += tgt;
    carry_eq += teq;
  }
}

// Descending ranks (1 = largest) among `total` keys, the n_nan lowest of which are NaN, of the
// order statistics torch.quantile("linear") reads for Q1 and Q3 of the n = total - n_nan numbers:
// {Q1 lo, Q1 hi, Q3 lo, Q3 hi}; hi is the next order statistic, used only when its weight > 0
// (as cpu::upper_fence). Needs n >= 1.
__device__ __forceinline__ void quartile_targets(int64_t n_nan, int64_t total, uint32_t (&k)[4],
                                                 float (&w)[2]) {
  const int64_t n = total - n_nan;
  const float qs[2] = {0.25f, 0.75f};
#pragma unroll
  for (int t = 0; t < 2; ++t) {
    int64_t below;
    quantile_rank(qs[t], n, &below, &w[t]);
    below = below < n - 1 ? below : n - 1;  // never past the last number
    const int64_t above = (w[t] > 0.0f && below + 1 < n) ? below + 1 : below;
    k[2 * t] = static_cast<uint32_t>(total - (n_nan + below));
    k[2 * t + 1] = static_cast<uint32_t>(total - (n_nan + above));
  }
}

// Upper fence from the four order-statistic keys found for quartile_targets.
__device__ __forceinline__ float fence_from_keys(const uint32_t (&T)[4], const float (&w)[2],
                                                 float whisker) {
  float q[2];
#pragma unroll
  for (int t = 0; t < 2; ++t) {
    const float lo = key_float(T[2 * t]);
    const float hi = w[t] > 0.0f ? key_float(T[2 * t + 1]) : lo;
    q[t] = quantile_lerp(lo, hi, w[t]);
  }
  return iqr_fence(q[0], q[1], whisker);
}

// ---- vector memory access: VEC elements of T as one 2/4/8/16-byte transaction

template <typename T, int VEC>
struct Pack {
  T v[VEC];
};

// Streaming read (evict-first): token rows are read once.
template <typename T, int VEC>
__device__ __forceinline__ Pack<T, VEC> load_stream(const T* p) {
  using R = typename RawOf<sizeof(T) * VEC>::type;
  const R r = __ldcs(reinterpret_cast<const R*>(p));
  Pack<T, VEC> out;
  memcpy(&out, &r, sizeof(R));
  return out;
}

// Plain read: coherent with this thread's own earlier stores in the same kernel.
template <typename T, int VEC>
__device__ __forceinline__ Pack<T, VEC> load_plain(const T* p) {
  using R = typename RawOf<sizeof(T) * VEC>::type;
  const R r = *reinterpret_cast<const R*>(p);
  Pack<T, VEC> out;
  memcpy(&out, &r, sizeof(R));
  return out;
}

template <typename T, int VEC>
__device__ __forceinline__ void store_pack(T* p, const Pack<T, VEC>& v) {
  using R = typename RawOf<sizeof(T) * VEC>::type;
  R r;
  memcpy(&r, &v, sizeof(R));
  *reinterpret_cast<R*>(p) = r;
}

// ---- host side

// Checks that `kernel` can run with `dyn` bytes of dynamic shared memory (N keys of one row) and
// opts in beyond the default 48 KiB. Raises ValueError naming N when the GPU has too little.
template <typename Kernel>
inline void prepare_shared_memory(Kernel* kernel, size_t dyn, const char* op, int64_t n) {
  cudaFuncAttributes attr;
  C10_CUDA_CHECK(cudaFuncGetAttributes(&attr, kernel));
  const size_t limit = at::cuda::getCurrentDeviceProperties()->sharedMemPerBlockOptin;
  const size_t need = attr.sharedSizeBytes + dyn;
  TORCH_CHECK_VALUE(need <= limit, op, ": N = ", n, " tokens need ", need,
                    " bytes of shared memory per block, more than this GPU's ", limit,
                    "; use the cpu or reference backend for such rows");
  if (need > 48 * 1024) {
    // The largest size is set once and for all, so concurrent callers never lower it.
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        static_cast<int>(limit - attr.sharedSizeBytes)));
  }
}

}  // namespace epic::cuda
