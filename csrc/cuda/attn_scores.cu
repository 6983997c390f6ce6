// CUDA kernels of attn_scores (contract in ops.h; same algorithm as csrc/cpu/attn_scores.cpp):
// softmax probabilities of a few query rows over a key span, reduced over heads and rows, with K
// read once and no [B, H, Q, L] score matrix.
//
// scan     grid (B * Hkv units, C key chunks of CK keys), 128 threads. A unit is (sample, kv
//          head) with its R = (H / Hkv) * Q query rows (contiguous in the fp32 copy of q), taken
//          up to kRowTile at a time into shared memory. Threads form groups of G lanes (G = the
//          16-byte packs of a key row, up to 32); a group takes every (128 / G)-th key of the
//          chunk, loads it once and accumulates its dot products with all rows of the tile, then
//          reduces them over the group (xor butterfly). Keys that no row sees (before kv_start,
//          after the last query position) are skipped.
//            no lse: each group keeps every row's online (max, sum exp) over its visible keys;
//              at the end of a tile the groups' states are merged in group order into
//              stats [units, C, R, 2], and the raw span scores go to span [B, H * Q, key_len];
//            lse given (one pass): sum over the tile's rows of exp(s - lse) per span key, kept
//              in shared memory by the key's group across tiles, written to partial
//              [units, key_len] (each span key lies in exactly one chunk: no atomics).
// lse      (no lse given) one thread per (b, h, i): the chunks' (max, sum) merged in chunk order
//          -> the row's log-sum-exp.
// combine  one thread per (b, t): the kv heads' partials in order, or the rows in (h, i) order
//          adding exp(span score - lse) over visible keys; / (H * Q) for mean; NaN outside [0, L).
// Deterministic for a given shape (fixed orders everywhere, no float atomics). Index values are
// clamped before any use, so unchecked inputs never cause an out-of-bounds access.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <limits>

#include "device_common.cuh"
#include "epic/checks.h"
#include "epic/ops.h"
#include "reduce.cuh"

namespace epic {

namespace {

constexpr int kThreads = 128;
constexpr int kRowTile = 8;              // rows per tile: accumulators per lane
constexpr int64_t kMaxQTileFloats = 9600;  // fp32 query tile in shared memory (37.5 KiB)

__device__ __forceinline__ int64_t imin(int64_t a, int64_t b) { return a < b ? a : b; }
__device__ __forceinline__ int64_t imax(int64_t a, int64_t b) { return a > b ? a : b; }

struct Index {
  const int64_t* key_start;
  int64_t key_start_int;
  const int64_t* kv_start;
  int64_t kv_start_int;
  const int64_t* q_pos;  // [B, Q] or null
  int64_t Q, L, key_len;
  bool causal;

  // Last visible key of query row i of sample b, in [-1, L - 1].
  __device__ __forceinline__ int64_t row_hi(int64_t b, int64_t i) const {
    if (!causal) return L - 1;
    const int64_t pos = q_pos ? q_pos[b * Q + i] : L - Q + i;
    return imax(imin(pos, L - 1), -1);
  }
  // First visible key of sample b, in [0, L].
  __device__ __forceinline__ int64_t lo(int64_t b) const {
    const int64_t v = kv_start ? kv_start[b] : kv_start_int;
    return imin(imax(v, 0), L);
  }
  // Span start of sample b, clamped to [-key_len, L] (the same entries fall outside [0, L)).
  __device__ __forceinline__ int64_t span_start(int64_t b) const {
    const int64_t v = key_start ? key_start[b] : key_start_int;
    return imin(imax(v, -key_len), L);
  }
};

template <typename T>
struct ScanArgs {
  const T* k;
  int64_t sk0, sk1, sk2;
  const float* q;    // fp32 [B, H, Q, d] contiguous
  const float* lse;  // fp32 [B, H, Q] contiguous, or null
  Index ix;
  int64_t Hkv, R, d;
  int C, CK, G, rt_max;
  float scale;
  float* stats;    // [units, C, R, 2]
  float* span;     // [B, H * Q, key_len] == [units, R, key_len]
  float* partial;  // [units, key_len]
};

// VEC storage elements -> fp32.
template <typename T, int VEC>
struct KLoad {
  static __device__ __forceinline__ void load(const T* p, float (&o)[VEC]) {
#pragma unroll
    for (int v = 0; v < VEC; ++v) o[v] = static_cast<float>(p[v]);
  }
};
template <>
struct KLoad<float, 4> {
  static __device__ __forceinline__ void load(const float* p, float (&o)[4]) {
    const float4 r = *reinterpret_cast<const float4*>(p);
    o[0] = r.x, o[1] = r.y, o[2] = r.z, o[3] = r.w;
  }
};
template <typename T>  // bf16 / fp16
struct KLoad<T, 8> {
  static __device__ __forceinline__ void load(const T* p, float (&o)[8]) {
    cuda::unpack8<T>(*reinterpret_cast<const uint4*>(p), o);
  }
};

template <typename T, int VEC, bool HAS_LSE>
__global__ void __launch_bounds__(kThreads) attn_scan_kernel(const ScanArgs<T> a) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const int G = a.G, ngroups = kThreads / G;
  const int grp = threadIdx.x / G, lane = threadIdx.x % G;
  const int wl = threadIdx.x & 31;
  const unsigned gmask = G == 32 ? 0xFFFFFFFFu : (((1u << G) - 1u) << (wl & ~(G - 1)));
  int64_t* hi_s = reinterpret_cast<int64_t*>(smem_raw);         // [kRowTile]
  float* lse_s = reinterpret_cast<float*>(hi_s + kRowTile);      // [kRowTile]
  float* qs = lse_s + kRowTile;                                  // [rt_max, d]
  float* gm = qs + a.rt_max * a.d;                               // [ngroups, kRowTile]
  float* gz = gm + ngroups * kRowTile;                           // [ngroups, kRowTile]
  float* pacc = gz + ngroups * kRowTile;                         // [CK]

  const int64_t u = blockIdx.x, c = blockIdx.y;
  const int64_t b = u / a.Hkv, kvh = u % a.Hkv;
  const int64_t R = a.R, d = a.d, L = a.ix.L, key_len = a.ix.key_len;
  const int64_t lo = a.ix.lo(b), ks = a.ix.span_start(b);
  int64_t hi_max = -1;
  for (int64_t i = 0; i < a.ix.Q; ++i) hi_max = imax(hi_max, a.ix.row_hi(b, i));
  const int64_t j_begin = c * a.CK, j_end = imin(L, j_begin + a.CK);
  const T* kb = a.k + b * a.sk0 + kvh * a.sk1;
  const float* qu = a.q + u * R * d;
  if (HAS_LSE)
    for (int jj = threadIdx.x; jj < a.CK; jj += kThreads) pacc[jj] = 0.0f;

  for (int64_t r0 = 0; r0 < R; r0 += a.rt_max) {
    const int rt = static_cast<int>(imin(a.rt_max, R - r0));
    __syncthreads();  // the previous tile's readers of qs / gm / gz are done
    for (int64_t x = threadIdx.x; x < rt * d; x += kThreads) qs[x] = qu[r0 * d + x];
    if (threadIdx.x < rt) {
      hi_s[threadIdx.x] = a.ix.row_hi(b, (r0 + threadIdx.x) % a.ix.Q);
      if (HAS_LSE) lse_s[threadIdx.x] = a.lse[u * R + r0 + threadIdx.x];
    }
    __syncthreads();

    float m[kRowTile], z[kRowTile];
#pragma unroll
    for (int r = 0; r < kRowTile; ++r) m[r] = -INFINITY, z[r] = 0.0f;
    for (int64_t j = j_begin + grp; j < j_end; j += ngroups) {
      if (j < lo || j > hi_max) continue;  // no row sees the key (uniform over the group)
      const T* kj = kb + j * a.sk2;
      float acc[kRowTile];
#pragma unroll
      for (int r = 0; r < kRowTile; ++r) acc[r] = 0.0f;
      for (int64_t e = static_cast<int64_t>(lane) * VEC; e < d; e += static_cast<int64_t>(G) * VEC) {
        float kv[VEC];
        KLoad<T, VEC>::load(kj + e, kv);
#pragma unroll
        for (int r = 0; r < kRowTile; ++r) {
          if (r < rt) {
            const float* qr = qs + r * d + e;
#pragma unroll
            for (int v = 0; v < VEC; ++v) acc[r] += qr[v] * kv[v];
          }
        }
      }
      cuda::warp_reduce_each(acc, rt, G, cuda::Sum{}, gmask);  // rt: uniform
      const bool in_span = j >= ks && j < ks + key_len;
      if (HAS_LSE) {
        if (in_span && lane == 0) {
          float sum = 0.0f;  // the tile's rows in order
#pragma unroll
          for (int r = 0; r < kRowTile; ++r)
            if (r < rt && j <= hi_s[r]) sum += expf(acc[r] * a.scale - lse_s[r]);
          pacc[j - j_begin] += sum;  // the key's group owns this entry in every tile
        }
      } else {
#pragma unroll
        for (int r = 0; r < kRowTile; ++r) {
          if (r < rt) {
            const float s = acc[r] * a.scale;
            if (j <= hi_s[r]) {  // online (max, sum exp) over the row's visible keys
              if (s > m[r]) {
                z[r] = z[r] * expf(m[r] - s) + 1.0f;
                m[r] = s;
              } else {
                z[r] += expf(s - m[r]);
              }
            }
            if (in_span && r % G == lane) a.span[(u * R + r0 + r) * key_len + (j - ks)] = s;
          }
        }
      }
    }
    if (!HAS_LSE) {
      if (lane == 0) {
#pragma unroll
        for (int r = 0; r < kRowTile; ++r) gm[grp * kRowTile + r] = m[r], gz[grp * kRowTile + r] = z[r];
      }
      __syncthreads();
      if (threadIdx.x < rt) {  // merge the groups in order
        const int r = threadIdx.x;
        const cuda::MaxSumExp ms = cuda::merge_max_sumexp(gm + r, gz + r, ngroups, kRowTile);
        float* st = a.stats + ((u * a.C + c) * R + r0 + r) * 2;
        st[0] = ms.m;
        st[1] = ms.z;
      }
    }
  }
  if (HAS_LSE) {
    __syncthreads();
    for (int64_t j = j_begin + threadIdx.x; j < j_end; j += kThreads)
      if (j >= ks && j < ks + key_len) a.partial[u * key_len + (j - ks)] = pacc[j - j_begin];
  }
}

// One thread per (b, row = h * Q + i): log-sum-exp of the row from the chunks, in chunk order.
__global__ void attn_lse_kernel(const float* stats, float* row_lse, int64_t B, int64_t HQ,
                                int64_t Hkv, int64_t R, int C) {
  const int64_t x = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (x >= B * HQ) return;
  const int64_t b = x / HQ, row = x % HQ, kvh = row / R, r = row % R;
  const float* st = stats + ((b * Hkv + kvh) * C * R + r) * 2;  // chunk c at + c * R * 2
  const cuda::MaxSumExp ms = cuda::merge_max_sumexp(st, st + 1, C, R * 2);
  row_lse[x] = ms.m != -INFINITY ? ms.m + logf(ms.z) : -INFINITY;
}

template <bool HAS_LSE>
__global__ void attn_combine_kernel(const float* span, const float* row_lse, const float* partial,
                                    Index ix, int64_t H, int64_t Hkv, float* out, bool mean,
                                    float inv) {
  const int64_t b = blockIdx.x;
  const int64_t t = static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x;
  const int64_t key_len = ix.key_len, L = ix.L, Q = ix.Q;
  if (t >= key_len) return;
  const int64_t j = ix.span_start(b) + t;
  if (j < 0 || j >= L) {
    out[b * key_len + t] = NAN;
    return;
  }
  float acc = 0.0f;
  if (HAS_LSE) {
    for (int64_t h = 0; h < Hkv; ++h) acc += partial[(b * Hkv + h) * key_len + t];
  } else {
    const int64_t lo = ix.lo(b), HQ = H * Q;
    if (j >= lo) {
      for (int64_t row = 0; row < HQ; ++row) {
        if (j > ix.row_hi(b, row % Q)) continue;
        acc += expf(span[(b * HQ + row) * key_len + t] - row_lse[b * HQ + row]);
      }
    }
  }
  out[b * key_len + t] = mean ? acc * inv : acc;
}

template <typename T, int VEC>
void launch_scan(const ScanArgs<T>& a, int64_t units, size_t smem, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(units), static_cast<unsigned>(a.C));
  if (a.lse)
    attn_scan_kernel<T, VEC, true><<<grid, kThreads, smem, stream>>>(a);
  else
    attn_scan_kernel<T, VEC, false><<<grid, kThreads, smem, stream>>>(a);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T>
void run_scan(ScanArgs<T> a, int64_t units, const at::Tensor& k, cudaStream_t stream) {
  constexpr int VEC = sizeof(T) == 4 ? 4 : 8;  // 16-byte packs
  const bool packed = a.d % VEC == 0 && a.sk0 % VEC == 0 && a.sk1 % VEC == 0 &&
                      a.sk2 % VEC == 0 && reinterpret_cast<uintptr_t>(k.data_ptr()) % 16 == 0;
  const int vec = packed ? VEC : 1;
  const int64_t packs = (a.d + vec - 1) / vec;
  int G = 1;
  while (G < 32 && G < packs) G *= 2;
  a.G = G;
  const int ngroups = kThreads / G;
  const size_t smem = kRowTile * sizeof(int64_t) +
                      (kRowTile + a.rt_max * a.d + 2 * ngroups * kRowTile + a.CK) * sizeof(float);
  if (packed)
    launch_scan<T, VEC>(a, units, smem, stream);
  else
    launch_scan<T, 1>(a, units, smem, stream);
}

}  // namespace

at::Tensor attn_scores_cuda(const at::Tensor& q_in, const at::Tensor& k_in,
                            const std::optional<at::Tensor>& lse_in,
                            const std::optional<at::Tensor>& key_start_in, int64_t key_start_int,
                            int64_t key_len, const std::optional<at::Tensor>& kv_start_in,
                            int64_t kv_start_int, const std::optional<at::Tensor>& q_pos_in,
                            double scale, bool causal, int64_t reduction) {
  check_attn_inputs(q_in, k_in, lse_in, key_start_in, key_start_int, key_len, kv_start_in,
                    q_pos_in, scale, reduction);
  check_cuda_tensor(q_in, "q");
  const int64_t B = q_in.size(0), H = q_in.size(1), Q = q_in.size(2), d = q_in.size(3);
  const int64_t Hkv = k_in.size(1), L = k_in.size(2);
  TORCH_CHECK_VALUE(d <= kMaxQTileFloats, "q's head size d = ", d,
                    " is above what the CUDA kernel holds in shared memory (", kMaxQTileFloats, ")");
  const c10::cuda::CUDAGuard guard(q_in.device());
  at::Tensor out = new_output({B, key_len}, q_in.options().dtype(at::kFloat));
  if (B == 0) return out;
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();

  const at::Tensor q = q_in.to(at::kFloat).contiguous();
  const at::Tensor k = (k_in.stride(3) == 1 || d == 1) ? k_in : k_in.contiguous();
  const auto lse = contiguous_opt(lse_in);
  const auto key_start = contiguous_opt(key_start_in);
  const auto kv_start = contiguous_opt(kv_start_in);
  const auto q_pos = contiguous_opt(q_pos_in);

  const int64_t G = H / Hkv, R = G * Q, units = B * Hkv;
  TORCH_CHECK_VALUE(units <= std::numeric_limits<int32_t>::max(), "B * Hkv is too large");
  // Keys per block: 64, halved (down to 16) until the grid has about four blocks per SM.
  const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  int64_t CK = 64;
  while (CK > 16 && ((L + CK - 1) / CK) * units < 4 * sms) CK /= 2;
  CK = std::max<int64_t>(CK, (L + 65534) / 65535);  // gridDim.y <= 65535
  const int64_t C = (L + CK - 1) / CK;

  Index ix{};
  ix.key_start = key_start ? key_start->data_ptr<int64_t>() : nullptr;
  ix.key_start_int = key_start_int;
  ix.kv_start = kv_start ? kv_start->data_ptr<int64_t>() : nullptr;
  ix.kv_start_int = kv_start_int;
  ix.q_pos = q_pos ? q_pos->data_ptr<int64_t>() : nullptr;
  ix.Q = Q, ix.L = L, ix.key_len = key_len, ix.causal = causal;

  const auto f32 = q.options();
  at::Tensor stats, span, partial, row_lse;
  if (lse) {
    partial = at::empty({units, key_len}, f32);
  } else {
    stats = at::empty({units, C, R, 2}, f32);
    span = at::empty({B, H * Q, key_len}, f32);
  }

  auto fill = [&](auto& a) {
    a.sk0 = k.stride(0), a.sk1 = k.stride(1), a.sk2 = k.stride(2);
    a.q = q.data_ptr<float>();
    a.lse = lse ? lse->data_ptr<float>() : nullptr;
    a.ix = ix;
    a.Hkv = Hkv, a.R = R, a.d = d;
    a.C = static_cast<int>(C), a.CK = static_cast<int>(CK);
    a.rt_max = static_cast<int>(std::clamp<int64_t>(kMaxQTileFloats / d, 1, std::min<int64_t>(kRowTile, R)));
    a.scale = static_cast<float>(scale);
    a.stats = lse ? nullptr : stats.data_ptr<float>();
    a.span = lse ? nullptr : span.data_ptr<float>();
    a.partial = lse ? partial.data_ptr<float>() : nullptr;
  };
  switch (k.scalar_type()) {  // the dtypes check_attn_inputs admits
    case at::kFloat: {
      ScanArgs<float> a{};
      a.k = k.data_ptr<float>();
      fill(a);
      run_scan(a, units, k, stream);
      break;
    }
    case at::kBFloat16: {
      ScanArgs<c10::BFloat16> a{};
      a.k = k.data_ptr<c10::BFloat16>();
      fill(a);
      run_scan(a, units, k, stream);
      break;
    }
    default: {
      ScanArgs<c10::Half> a{};
      a.k = k.data_ptr<c10::Half>();
      fill(a);
      run_scan(a, units, k, stream);
      break;
    }
  }

  if (!lse) {
    row_lse = at::empty({B, H * Q}, f32);
    const int64_t n = B * H * Q;
    attn_lse_kernel<<<static_cast<unsigned>((n + 255) / 256), 256, 0, stream>>>(
        stats.data_ptr<float>(), row_lse.data_ptr<float>(), B, H * Q, Hkv, R, static_cast<int>(C));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  const dim3 grid(static_cast<unsigned>(B), static_cast<unsigned>((key_len + 255) / 256));
  const bool mean = reduction == kReduceMean;
  const float inv = 1.0f / static_cast<float>(H * Q);
  if (lse)
    attn_combine_kernel<true><<<grid, 256, 0, stream>>>(nullptr, nullptr, partial.data_ptr<float>(),
                                                        ix, H, Hkv, out.data_ptr<float>(), mean, inv);
  else
    attn_combine_kernel<false><<<grid, 256, 0, stream>>>(span.data_ptr<float>(),
                                                         row_lse.data_ptr<float>(), nullptr, ix, H,
                                                         Hkv, out.data_ptr<float>(), mean, inv);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace epic
