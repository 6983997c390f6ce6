// CUDA kernels of the selection family: top-k in spatial order and IQR outlier selection.
//
// One thread block per row: the row's N keys (float_key of the fp32 score) sit in shared memory,
// a 4-pass radix select finds the k-th largest key, and a block-wide scan emits the kept indices
// in ascending order (ties to the lower index). Per-image IQR finds its four quartile order
// statistics with the same radix select (one set of passes for all four). Pooled IQR first runs
// four histogram passes over all B*N scores with global histograms (the last block of each pass
// picks the digit), then a counting pass; the row kernel reads the resulting total from device
// memory, so nothing ever waits on the host.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <algorithm>
#include <limits>

#include "epic/checks.h"
#include "epic/ops.h"
#include "select_device.cuh"

namespace epic {

namespace {

using cuda::SelectSmem;

// Device state of the pooled IQR pipeline, zeroed by the host (at::zeros) before the first pass.
struct PooledState {
  uint32_t hist[4][4][256];  // [pass][target][digit]; pass 0 uses target 0 only
  uint32_t ticket[4];        // blocks done with each pass: the last one picks the digits
  uint32_t n_nan;            // NaN scores among the B*N
  uint32_t total;            // scores > fence
  uint32_t prefix[4], krem[4], greater[4];  // radix state of the 4 quartile order statistics
};

constexpr int kPooledThreads = 512;

int row_threads(int64_t n) { return n <= 2048 ? 256 : (n <= 4096 ? 512 : 1024); }

// Loads one score row as keys into shared memory; returns the number of NaN scores (all threads).
__device__ uint32_t load_row_keys(const float* row, int64_t sn, int n, uint32_t* keys,
                                  uint32_t* red) {
  uint32_t nan = 0;
  for (int i = threadIdx.x; i < n; i += blockDim.x) {
    const uint32_t key = float_key(row[i * sn]);
    keys[i] = key;
    nan += key == 0u;
  }
  return cuda::block_sum(nan, red);  // its barriers also publish keys[]
}

__global__ void __launch_bounds__(1024)
    select_topk_kernel(const float* __restrict__ s, int64_t sb, int64_t sn, int n, int k,
                       int64_t* __restrict__ idx) {
  extern __shared__ uint32_t keys[];
  __shared__ SelectSmem<1> sm;
  const int b = blockIdx.x;
  load_row_keys(s + b * sb, sn, n, keys, sm.red);
  const uint32_t kk[1] = {static_cast<uint32_t>(k)};
  uint32_t T[1], greater[1];
  cuda::block_radix_select<1>(keys, n, kk, sm, T, greater);
  int64_t* out = idx + static_cast<int64_t>(b) * k;
  cuda::block_emit(keys, n, T[0], kk[0] - greater[0], sm, nullptr,
                   [&](int i, uint32_t pos) { out[pos] = i; });
}

// counts[b] and indices[b, :]: the fence of the row (or the pooled total), the top-c selection,
// -1 padding. `pooled` is null for per-image fences.
__global__ void __launch_bounds__(1024)
    iqr_rows_kernel(const float* __restrict__ s, int64_t sb, int64_t sn, int n, int64_t batch,
                    float whisker, int64_t cap, const PooledState* __restrict__ pooled,
                    int64_t* __restrict__ counts, int64_t* __restrict__ indices) {
  extern __shared__ uint32_t keys[];
  __shared__ SelectSmem<4> sm;
  const int b = blockIdx.x;
  const uint32_t n_nan = load_row_keys(s + b * sb, sn, n, keys, sm.red);
  int64_t c = 0;
  if (pooled != nullptr) {
    c = static_cast<int64_t>(pooled->total) / batch;  // floor(total outliers / B)
  } else if (n_nan < static_cast<uint32_t>(n)) {
    uint32_t k[4], T[4], greater[4];
    float w[2];
    cuda::quartile_targets(n_nan, n, k, w);
    cuda::block_radix_select<4>(keys, n, k, sm, T, greater);
    const float fence = cuda::fence_from_keys(T, w, whisker);
    uint32_t above = 0;
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
      const uint32_t key = keys[i];
      above += key != 0u && key_float(key) > fence;  // NaN (key 0) is never an outlier
    }
    c = cuda::block_sum(above, sm.red);
  }  // else: no number in the row, NaN fence, no outlier
  c = c < cap ? c : cap;
  if (threadIdx.x == 0) counts[b] = c;
  int64_t* out = indices + static_cast<int64_t>(b) * n;
  const cuda::TopkCut cut = cuda::block_topk_cut(keys, n, static_cast<uint32_t>(c), sm);
  cuda::block_emit(keys, n, cut.T, cut.ties, sm, nullptr,
                   [&](int i, uint32_t pos) { out[pos] = i; });
  for (int64_t p = c + threadIdx.x; p < n; p += blockDim.x) out[p] = -1;
}

// One radix pass over all B*N pooled keys (pass 0 also counts the NaNs). Blocks add their shared
// histograms to the global one; the last block to finish picks the next digit of each target.
__global__ void __launch_bounds__(kPooledThreads)
    pooled_pass_kernel(const float* __restrict__ s, int64_t sb, int64_t sn, uint32_t n,
                       uint32_t total, int pass, PooledState* st) {
  __shared__ uint32_t h[4][256];
  __shared__ uint32_t red[32];
  __shared__ bool last;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  uint32_t n_nan = 0;
  if (pass > 0) {
    n_nan = st->n_nan;
    if (n_nan == total) return;  // no number at all: the fence is NaN, nothing to select
  }
  for (int t = tid; t < 4 * 256; t += blockDim.x) (&h[0][0])[t] = 0;
  const int shift = 24 - 8 * pass;
  const uint32_t mask = pass == 0 ? 0u : (0xFFFFFFFFu << (shift + 8));
  uint32_t pre[4];
  int src[4];
#pragma unroll
  for (int t = 0; t < 4; ++t) pre[t] = pass == 0 ? 0u : st->prefix[t];
#pragma unroll
  for (int t = 0; t < 4; ++t) {
    src[t] = t;
    for (int u = t - 1; u >= 0; --u)
      if (pre[u] == pre[t]) src[t] = u;
  }
  __syncthreads();
  uint32_t nan_local = 0;
  for (uint32_t e = blockIdx.x * blockDim.x + tid; e < total; e += gridDim.x * blockDim.x) {
    const uint32_t b = e / n, i = e - b * n;
    const uint32_t key = float_key(s[b * sb + i * sn]);
    const uint32_t digit = (key >> shift) & 0xFFu;
    nan_local += key == 0u;
#pragma unroll
    for (int t = 0; t < 4; ++t)
      if (src[t] == t && (key & mask) == pre[t]) atomicAdd(&h[t][digit], 1u);
  }
  __syncthreads();
  for (int t = tid; t < 4 * 256; t += blockDim.x) {
    const uint32_t v = (&h[0][0])[t];
    if (v != 0u) atomicAdd(&st->hist[pass][0][0] + t, v);
  }
  if (pass == 0) {
    const uint32_t nan_block = cuda::block_sum(nan_local, red);
    if (tid == 0 && nan_block != 0u) atomicAdd(&st->n_nan, nan_block);
  }
  __threadfence();  // this block's histogram before its ticket
  __syncthreads();
  if (tid == 0) last = atomicAdd(&st->ticket[pass], 1u) == gridDim.x - 1;
  __syncthreads();
  if (!last) return;
  __threadfence();
  if (pass == 0) n_nan = __ldcg(&st->n_nan);
  if (n_nan == total) return;
  if (warp < 4) {
    uint32_t k[4] = {0u, 0u, 0u, 0u}, my_pre = 0, kr = 0, gr = 0;
    int my_src = 0;
    float w[2] = {0.0f, 0.0f};
    if (pass == 0) cuda::quartile_targets(n_nan, total, k, w);
#pragma unroll
    for (int t = 0; t < 4; ++t)  // no dynamic indexing of the small arrays (local memory)
      if (t == warp) {
        my_pre = pre[t];
        my_src = src[t];
        kr = pass == 0 ? k[t] : st->krem[t];
        gr = pass == 0 ? 0u : st->greater[t];
      }
    __syncwarp();  // every lane has read the state before one lane rewrites it
    const uint32_t* hs = &st->hist[pass][my_src][0];  // pass 0: every target shares bin set 0
    uint32_t c[8];
#pragma unroll
    for (int j = 0; j < 8; ++j) c[j] = __ldcg(hs + lane * 8 + j);  // L2: other blocks' atomics
    uint32_t digit, cum;
    if (cuda::warp_pick_digit(c, kr, lane, &digit, &cum)) {
      st->prefix[warp] = my_pre | (digit << shift);
      st->greater[warp] = gr + cum;
      st->krem[warp] = kr - cum;
    }
  }
}

// Counts the pooled scores above the fence into st->total.
__global__ void __launch_bounds__(kPooledThreads)
    pooled_count_kernel(const float* __restrict__ s, int64_t sb, int64_t sn, uint32_t n,
                        uint32_t total, float whisker, PooledState* st) {
  __shared__ uint32_t red[32];
  const uint32_t n_nan = st->n_nan;
  if (n_nan == total) return;
  uint32_t k[4], T[4];
  float w[2];
  cuda::quartile_targets(n_nan, total, k, w);
#pragma unroll
  for (int t = 0; t < 4; ++t) T[t] = st->prefix[t];
  const float fence = cuda::fence_from_keys(T, w, whisker);
  uint32_t above = 0;
  for (uint32_t e = blockIdx.x * blockDim.x + threadIdx.x; e < total; e += gridDim.x * blockDim.x) {
    const uint32_t b = e / n, i = e - b * n;
    above += s[b * sb + i * sn] > fence;
  }
  const uint32_t block = cuda::block_sum(above, red);
  if (threadIdx.x == 0 && block != 0u) atomicAdd(&st->total, block);
}

void check_cuda_scores(const at::Tensor& scores) {
  check_cuda_tensor(scores, "scores");
  TORCH_CHECK_VALUE(scores.size(1) <= std::numeric_limits<int32_t>::max(),
                    "scores: N = ", scores.size(1), " is too large");
}

}  // namespace

at::Tensor select_topk_cuda(const at::Tensor& scores_in, int64_t k) {
  check_scores(scores_in);
  const int64_t B = scores_in.size(0), N = scores_in.size(1);
  check_k(k, N);
  check_cuda_scores(scores_in);
  const c10::cuda::CUDAGuard guard(scores_in.device());
  auto idx = new_output({B, k}, scores_in.options().dtype(at::kLong));
  if (B == 0 || k == 0) return idx;
  const at::Tensor scores = scores_as_float(scores_in);
  const size_t smem = static_cast<size_t>(N) * sizeof(uint32_t);
  cuda::prepare_shared_memory(select_topk_kernel, smem, "select_topk", N);
  select_topk_kernel<<<static_cast<unsigned>(B), row_threads(N), smem,
                       at::cuda::getCurrentCUDAStream()>>>(
      scores.data_ptr<float>(), scores.stride(0), scores.stride(1), static_cast<int>(N),
      static_cast<int>(k), idx.data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return idx;
}

std::tuple<at::Tensor, at::Tensor> iqr_select_cuda(const at::Tensor& scores_in, double whisker,
                                                   bool pooled, int64_t max_k) {
  check_scores(scores_in);
  check_cuda_scores(scores_in);
  const int64_t B = scores_in.size(0), N = scores_in.size(1);
  const c10::cuda::CUDAGuard guard(scores_in.device());
  auto counts = new_output({B}, scores_in.options().dtype(at::kLong));
  auto indices = new_output({B, N}, scores_in.options().dtype(at::kLong));
  if (B == 0) return {counts, indices};
  if (N == 0) {  // no score: no fence, no outlier
    counts.zero_();
    return {counts, indices};
  }
  const at::Tensor scores = scores_as_float(scores_in);
  const float* s = scores.data_ptr<float>();
  const int64_t sb = scores.stride(0), sn = scores.stride(1);
  const float w = static_cast<float>(whisker);
  const int64_t cap = max_k >= 0 ? max_k : N;
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();

  at::Tensor state;
  if (pooled) {
    TORCH_CHECK_VALUE(B <= std::numeric_limits<int32_t>::max() / N, "iqr_select: B * N = ", B * N,
                      " pooled scores are too many for the cuda backend");
    const int64_t words = (sizeof(PooledState) + 3) / 4;
    state = at::zeros({words}, scores_in.options().dtype(at::kInt));
    PooledState* st = reinterpret_cast<PooledState*>(state.data_ptr<int32_t>());
    const uint32_t total = static_cast<uint32_t>(B * N);
    const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
    const int64_t per_block = int64_t(kPooledThreads) * 8;  // >= 8 scores per thread
    const int grid =
        static_cast<int>(std::min<int64_t>((total + per_block - 1) / per_block, 2 * sms));
    for (int pass = 0; pass < 4; ++pass) {
      pooled_pass_kernel<<<grid, kPooledThreads, 0, stream>>>(s, sb, sn, static_cast<uint32_t>(N),
                                                             total, pass, st);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    pooled_count_kernel<<<grid, kPooledThreads, 0, stream>>>(s, sb, sn, static_cast<uint32_t>(N),
                                                            total, w, st);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  const size_t smem = static_cast<size_t>(N) * sizeof(uint32_t);
  cuda::prepare_shared_memory(iqr_rows_kernel, smem, "iqr_select", N);
  iqr_rows_kernel<<<static_cast<unsigned>(B), row_threads(N), smem, stream>>>(
      s, sb, sn, static_cast<int>(N), B, w, cap,
      pooled ? reinterpret_cast<const PooledState*>(state.data_ptr<int32_t>()) : nullptr,
      counts.data_ptr<int64_t>(), indices.data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {counts, indices};
}

}  // namespace epic
