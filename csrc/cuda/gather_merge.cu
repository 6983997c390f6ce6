// CUDA kernels of the gather + merge family and the fused compress (top-k + gather + merge).
//
// Grid: one block of 256 threads per (image, slice of D). Inside a block, C threads stand side by
// side across the slice (VEC elements each: one 16-byte access when alignment allows, else one
// element) and R = 256 / C row groups take every R-th row, kUnroll rows in flight per thread.
// Each block first rebuilds its image's plan in shared memory (compress: the radix-select top-k
// of the N scores; gather: the bitmask of referenced rows; backward: the first slot of every row):
// cheap next to streaming N rows of its slice. Kept rows are copied, dropped rows accumulated in
// fp32 (fp64) registers, so every input element is read once; the R partial merges are summed in
// shared memory in a fixed order.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <algorithm>
#include <climits>
#include <cstdint>

#include "epic/checks.h"
#include "epic/ops.h"
#include "select_device.cuh"

namespace epic {

namespace {

using cuda::Pack;

constexpr int kThreads = 256;
constexpr int kMinBlocks = 4;  // <= 64 registers: 4 blocks per SM keep enough loads in flight
constexpr int kUnroll = 4;
constexpr int kPrefetchRows = 8;  // per row group, compress only
constexpr int kRedBytes = kThreads * 32;  // R partial merges of VEC accumulators (<= 32 bytes)

// Streaming operands shared by the three kernels.
template <typename T>
struct StreamArgs {
  const T* x;            // tokens (grad_out for the backward), inner stride 1
  int64_t xsb, xsn;      // batch / row strides of x
  T* out;                // fresh contiguous output, rows of D elements
  int64_t D;
  const acc_of<T>* w;    // [B, N] weights in the accumulation type (weighted merge) or null
  int N, merge;
  int C, n_slices;       // threads across a slice, slices per image
  int64_t V;             // vectors per row: D / VEC
};

// Where this thread works: row group g of R, vector c of C, element column col.
struct Lane {
  int g, R, c, C;
  int64_t col;
  bool active;  // col inside D (the last slice may be partial)
};

__device__ __forceinline__ Lane make_lane(int C, int slice, int64_t V, int vec) {
  Lane l;
  l.C = C;
  l.R = kThreads / C;
  l.g = threadIdx.x / C;
  l.c = threadIdx.x % C;
  const int64_t v = static_cast<int64_t>(slice) * C + l.c;
  l.active = v < V;
  l.col = v * vec;
  return l;
}

__device__ __forceinline__ int valid_rows(const int64_t* counts, int b, int K) {
  if (counts == nullptr) return K;
  const int64_t c = counts[b];  // clamped for memory safety; a bad count NaN-fills the image
  return c < 0 ? 0 : (c > K ? K : static_cast<int>(c));
}

__device__ __forceinline__ bool bad_count(const int64_t* counts, int b, int K) {
  return counts != nullptr && (counts[b] < 0 || counts[b] > K);
}

template <typename T, int VEC>
__device__ __forceinline__ Pack<T, VEC> zero_pack() {
  Pack<T, VEC> z;
#pragma unroll
  for (int e = 0; e < VEC; ++e) z.v[e] = static_cast<T>(0.0f);
  return z;
}

// An image with an idx entry outside [0, N) or a count outside [0, K] gets NaN in every row of
// its output (forward) or gradient (backward): the kernels never read the host to raise.
template <typename T, int VEC>
__device__ void fill_nan_rows(T* base, int64_t D, int rows, const Lane& l) {
  Pack<T, VEC> nan;
#pragma unroll
  for (int e = 0; e < VEC; ++e) nan.v[e] = static_cast<T>(__int_as_float(0x7fc00000));
  for (int j = l.g; j < rows; j += l.R)
    if (l.active) cuda::store_pack(base + static_cast<int64_t>(j) * D, nan);
}

// One image's slice of the forward output: rows j < n_copy copy x[src(j)] (src < 0: zeros), row
// n_copy is the merge of the rows with dropped(n) (merge != none), later rows up to rows_out are 0.
template <typename T, int VEC, typename Src, typename Dropped>
__device__ void stream_rows(const StreamArgs<T>& a, int b, const Lane& l, int n_copy, int rows_out,
                            Src src, Dropped dropped, int n_dropped, void* red_raw) {
  using acc_t = acc_of<T>;
  using P = Pack<T, VEC>;
  const T* xb = a.x + b * a.xsb + l.col;
  T* ob = a.out + static_cast<int64_t>(b) * rows_out * a.D + l.col;
  const P zero = zero_pack<T, VEC>();
  for (int j0 = l.g; j0 < n_copy; j0 += l.R * kUnroll) {
    P p[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int j = j0 + u * l.R;
      const int r = (l.active && j < n_copy) ? src(j) : -1;
      p[u] = r >= 0 ? cuda::load_stream<T, VEC>(xb + r * a.xsn) : zero;
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int j = j0 + u * l.R;
      if (l.active && j < n_copy) cuda::store_pack(ob + j * a.D, p[u]);
    }
  }
  int next = n_copy;
  if (a.merge != kMergeNone) {
    acc_t acc[VEC];
#pragma unroll
    for (int e = 0; e < VEC; ++e) acc[e] = acc_t(0);
    const acc_t* wb = a.w != nullptr ? a.w + static_cast<int64_t>(b) * a.N : nullptr;
    for (int n0 = l.g; n0 < a.N; n0 += l.R * kUnroll) {
      P p[kUnroll];
      bool take[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int n = n0 + u * l.R;
        take[u] = l.active && n < a.N && dropped(n);
        if (take[u]) p[u] = cuda::load_stream<T, VEC>(xb + n * a.xsn);
      }
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        if (!take[u]) continue;
        if (a.merge == kMergeMean) {
#pragma unroll
          for (int e = 0; e < VEC; ++e)
            acc[e] = cuda::add_rn(acc[e], static_cast<acc_t>(p[u].v[e]));
        } else {
          const acc_t wn = static_cast<acc_t>(__ldg(wb + n0 + u * l.R));
#pragma unroll
          for (int e = 0; e < VEC; ++e)
            acc[e] = cuda::add_rn(acc[e], cuda::mul_rn(wn, static_cast<acc_t>(p[u].v[e])));
        }
      }
    }
    acc_t* red = static_cast<acc_t*>(red_raw);
    if (l.g > 0) {
#pragma unroll
      for (int e = 0; e < VEC; ++e) red[(l.g * l.C + l.c) * VEC + e] = acc[e];
    }
    __syncthreads();
    if (l.g == 0 && l.active) {
      for (int r = 1; r < l.R; ++r) {
#pragma unroll
        for (int e = 0; e < VEC; ++e) acc[e] = cuda::add_rn(acc[e], red[(r * l.C + l.c) * VEC + e]);
      }
      P m;
#pragma unroll
      for (int e = 0; e < VEC; ++e) {
        acc_t v = acc[e];
        if (a.merge == kMergeMean && n_dropped > 0) v = v / static_cast<acc_t>(n_dropped);
        m.v[e] = static_cast<T>(v);
      }
      cuda::store_pack(ob + static_cast<int64_t>(n_copy) * a.D, m);
    }
    next = n_copy + 1;
  }
  for (int j = next + l.g; j < rows_out; j += l.R)
    if (l.active) cuda::store_pack(ob + static_cast<int64_t>(j) * a.D, zero);
}

// compress: top-k of the image's scores (every slice block recomputes it; slice 0 writes idx),
// then gather + merge of the slice.
template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads, kMinBlocks)
    compress_kernel(StreamArgs<T> a, const float* __restrict__ s, int64_t ssb, int64_t ssn, int k,
                    int64_t* __restrict__ idx) {
  extern __shared__ uint32_t dyn[];  // keys[N] (then the kept list, in place), bits[ceil(N/32)]
  __shared__ cuda::SelectSmem<1> sm;
  __shared__ alignas(16) unsigned char red[kRedBytes];
  const int b = blockIdx.x / a.n_slices, slice = blockIdx.x % a.n_slices;
  const int N = a.N;
  uint32_t* keys = dyn;
  uint32_t* bits = dyn + N;
  const Lane l = make_lane(a.C, slice, a.V, VEC);
  if (a.merge != kMergeNone && l.active) {
    // Every row is read when merging: warm L2 with the slice's first rows during the selection.
    for (int u = 0; u < kPrefetchRows; ++u) {
      const int n = l.g + u * l.R;
      const T* p = a.x + b * a.xsb + n * a.xsn + l.col;
      if (n < N) asm volatile("prefetch.global.L2 [%0];" ::"l"(p));
    }
  }
  const float* row = s + b * ssb;
  for (int i = threadIdx.x; i < N; i += blockDim.x) keys[i] = float_key(row[i * ssn]);
  __syncthreads();
  const cuda::TopkCut cut = cuda::block_topk_cut(keys, N, static_cast<uint32_t>(k), sm);
  int64_t* out_idx = slice == 0 ? idx + static_cast<int64_t>(b) * k : nullptr;
  cuda::block_emit(keys, N, cut.T, cut.ties, sm, bits, [&](int i, uint32_t pos) {
    keys[pos] = static_cast<uint32_t>(i);
    if (out_idx != nullptr) out_idx[pos] = i;
  });
  __syncthreads();
  stream_rows<T, VEC>(
      a, b, l, k, k + (a.merge != kMergeNone), [&](int j) { return static_cast<int>(keys[j]); },
      [&](int n) { return ((bits[n >> 5] >> (n & 31)) & 1u) == 0u; }, N - k, red);
}

template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads, kMinBlocks)
    gather_merge_kernel(StreamArgs<T> a, const int64_t* __restrict__ idx, int K,
                        const int64_t* __restrict__ counts) {
  extern __shared__ uint32_t bits[];  // ceil(N/32): rows referenced by a valid idx
  __shared__ uint32_t red32[32];
  __shared__ alignas(16) unsigned char red[kRedBytes];
  const int b = blockIdx.x / a.n_slices, slice = blockIdx.x % a.n_slices;
  const int N = a.N, words = (N + 31) >> 5;
  const int64_t* ib = idx + static_cast<int64_t>(b) * K;
  const int valid = valid_rows(counts, b, K);
  const int rows_out = K + (a.merge != kMergeNone);
  const Lane l = make_lane(a.C, slice, a.V, VEC);
  for (int w = threadIdx.x; w < words; w += blockDim.x) bits[w] = 0u;
  __syncthreads();
  int bad = bad_count(counts, b, K);
  for (int j = threadIdx.x; j < valid; j += blockDim.x) {
    const int64_t n = ib[j];
    if (n >= 0 && n < N)
      atomicOr(&bits[n >> 5], 1u << (n & 31));
    else
      bad = 1;
  }
  if (__syncthreads_or(bad)) {  // block-uniform: the whole block leaves
    fill_nan_rows<T, VEC>(a.out + static_cast<int64_t>(b) * rows_out * a.D + l.col, a.D, rows_out, l);
    return;
  }
  uint32_t referenced = 0;
  for (int w = threadIdx.x; w < words; w += blockDim.x) referenced += __popc(bits[w]);
  referenced = cuda::block_sum(referenced, red32);
  stream_rows<T, VEC>(
      a, b, l, valid, rows_out,
      [&](int j) { return static_cast<int>(ib[j]); },  // in [0, N): checked above
      [&](int n) { return ((bits[n >> 5] >> (n & 31)) & 1u) == 0u; },
      N - static_cast<int>(referenced), red);
}

// first[n] of the backward: the first valid slot referencing row n, kRepeated set when later
// slots reference it too; INT_MAX when none (K < 2^30, checked on the host).
constexpr int kRepeated = 1 << 30;
constexpr int kSlotMask = kRepeated - 1;

// a.x = grad_out [B, K + (merge != none), D], a.out = grad_tokens [B, N, D]. Every grad row is
// written once by the thread owning (n mod R, column): a row referenced once copies its slot's
// gradient; a repeated row is written after the main loop by the same thread, as the sum of its
// slots' gradients in acc_t, rounded once (as the reference).
template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads, kMinBlocks)
    gather_merge_backward_kernel(StreamArgs<T> a, const int64_t* __restrict__ idx, int K,
                                 const int64_t* __restrict__ counts) {
  using acc_t = acc_of<T>;
  using P = Pack<T, VEC>;
  extern __shared__ int first[];  // first[n]: first valid j with idx[j] == n, INT_MAX if none
  __shared__ uint32_t red32[32];
  const int b = blockIdx.x / a.n_slices, slice = blockIdx.x % a.n_slices;
  const int N = a.N;
  const int64_t* ib = idx + static_cast<int64_t>(b) * K;
  const int valid = valid_rows(counts, b, K);
  const Lane l = make_lane(a.C, slice, a.V, VEC);
  const T* gb = a.x + b * a.xsb + l.col;
  T* xb = a.out + static_cast<int64_t>(b) * N * a.D + l.col;
  for (int n = threadIdx.x; n < N; n += blockDim.x) first[n] = INT_MAX;
  __syncthreads();
  int bad = bad_count(counts, b, K);
  for (int j = threadIdx.x; j < valid; j += blockDim.x) {
    const int64_t n = ib[j];
    if (n >= 0 && n < N)
      atomicMin(&first[n], j);
    else
      bad = 1;
  }
  if (__syncthreads_or(bad)) {  // block-uniform: the whole block leaves
    fill_nan_rows<T, VEC>(xb, a.D, N, l);
    return;
  }
  uint32_t repeats = 0;  // slots that are not their row's first
  for (int j = threadIdx.x; j < valid; j += blockDim.x) {
    const int n = static_cast<int>(ib[j]);
    if ((first[n] & kSlotMask) != j) {  // only the flag bit changes concurrently
      atomicOr(&first[n], kRepeated);
      ++repeats;
    }
  }
  __syncthreads();
  uint32_t distinct = 0;
  for (int n = threadIdx.x; n < N; n += blockDim.x) distinct += first[n] != INT_MAX;
  distinct = cuda::block_sum(distinct, red32);
  repeats = cuda::block_sum(repeats, red32);
  const int n_dropped = N - static_cast<int>(distinct);

  const P zero = zero_pack<T, VEC>();
  acc_t gm[VEC];  // gradient of the merged row
  P mean_grad = zero;
#pragma unroll
  for (int e = 0; e < VEC; ++e) gm[e] = acc_t(0);
  if (a.merge != kMergeNone && l.active) {
    const P p = cuda::load_stream<T, VEC>(gb + valid * a.xsn);
    const acc_t cnt = static_cast<acc_t>(n_dropped > 1 ? n_dropped : 1);
#pragma unroll
    for (int e = 0; e < VEC; ++e) {
      gm[e] = static_cast<acc_t>(p.v[e]);
      mean_grad.v[e] = static_cast<T>(gm[e] / cnt);
    }
  }
  const acc_t* wb = a.w != nullptr ? a.w + static_cast<int64_t>(b) * N : nullptr;
  for (int n0 = l.g; n0 < N; n0 += l.R * kUnroll) {
    P p[kUnroll];
    int f[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int n = n0 + u * l.R;
      f[u] = (l.active && n < N) ? first[n] : INT_MAX;
      if (f[u] != INT_MAX && !(f[u] & kRepeated)) p[u] = cuda::load_stream<T, VEC>(gb + f[u] * a.xsn);
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int n = n0 + u * l.R;
      if (!l.active || n >= N) continue;
      P v;
      if (f[u] != INT_MAX) {
        if (f[u] & kRepeated) continue;  // written below
        v = p[u];  // kept once: the gradient of its slot
      } else if (a.merge == kMergeMean) {
        v = mean_grad;
      } else if (a.merge == kMergeWeighted) {
        const acc_t wn = static_cast<acc_t>(__ldg(wb + n));
#pragma unroll
        for (int e = 0; e < VEC; ++e) v.v[e] = static_cast<T>(cuda::mul_rn(wn, gm[e]));
      } else {
        v = zero;
      }
      cuda::store_pack(xb + n * a.D, v);
    }
  }
  if (repeats > 0 && l.active) {  // repeated rows: the sum over their slots, in j order
    for (int j = 0; j < valid; ++j) {
      const int n = static_cast<int>(ib[j]);
      if (n % l.R != l.g || first[n] != (j | kRepeated)) continue;  // a repeated row's first slot
      acc_t sum[VEC];
      const P g0 = cuda::load_stream<T, VEC>(gb + j * a.xsn);
#pragma unroll
      for (int e = 0; e < VEC; ++e) sum[e] = static_cast<acc_t>(g0.v[e]);
      for (int j2 = j + 1; j2 < valid; ++j2) {
        if (ib[j2] != n) continue;
        const P g = cuda::load_stream<T, VEC>(gb + j2 * a.xsn);
#pragma unroll
        for (int e = 0; e < VEC; ++e) sum[e] = cuda::add_rn(sum[e], static_cast<acc_t>(g.v[e]));
      }
      P v;
#pragma unroll
      for (int e = 0; e < VEC; ++e) v.v[e] = static_cast<T>(sum[e]);
      cuda::store_pack(xb + static_cast<int64_t>(n) * a.D, v);
    }
  }
}

// ---- host side

// Weights in the accumulation type of the tokens (fp64 for fp64 tokens, else fp32), as on the CPU.
at::Tensor opmath_weights(const std::optional<at::Tensor>& weights, int64_t merge,
                          at::ScalarType tokens_dtype) {
  if (merge != kMergeWeighted) return at::Tensor();
  return weights->to(tokens_dtype == at::kDouble ? at::kDouble : at::kFloat).contiguous();
}

void check_int_range(int64_t v, const char* what) {
  TORCH_CHECK_VALUE(v <= INT_MAX, what, " = ", v, " is too large for the cuda backend");
}

// Fills the streaming operands for x [B, rows, D] (inner stride 1) and a fresh output, picks the
// 16-byte vector path when every pointer and stride allows it, and splits D into slices: up to 64
// vectors per slice, narrower (down to 8) while there are fewer than 2 blocks per SM.
template <typename T>
StreamArgs<T> stream_args(const at::Tensor& x, const at::Tensor& out, const at::Tensor& wf,
                          int64_t n, int64_t merge, bool* vec) {
  constexpr int kVec = 16 / sizeof(T);
  StreamArgs<T> a;
  a.x = x.data_ptr<T>();
  a.xsb = x.size(0) > 1 ? x.stride(0) : 0;  // strides of size-1 dims never matter
  a.xsn = x.size(1) > 1 ? x.stride(1) : 0;
  a.out = out.data_ptr<T>();
  a.D = x.size(2);
  a.w = wf.defined() ? wf.data_ptr<acc_of<T>>() : nullptr;
  a.N = static_cast<int>(n);
  a.merge = static_cast<int>(merge);
  *vec = a.D % kVec == 0 && a.xsb % kVec == 0 && a.xsn % kVec == 0 &&
         reinterpret_cast<uintptr_t>(a.x) % 16 == 0 && reinterpret_cast<uintptr_t>(a.out) % 16 == 0;
  a.V = *vec ? a.D / kVec : a.D;
  const int64_t B = x.size(0);
  auto slices = [&](int c) { return std::max<int64_t>(1, (a.V + c - 1) / c); };
  int C = 1;
  while (C < 64 && C < a.V) C *= 2;
  const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  while (C > 8 && B * slices(C) < 2 * sms) C /= 2;
  TORCH_CHECK_VALUE(B * slices(C) <= INT_MAX, "tokens: B * D = ", B * a.D,
                    " is too large for the cuda backend");
  a.C = C;
  a.n_slices = static_cast<int>(slices(C));
  return a;
}

// Launches kernel<T, 16-byte VEC> or kernel<T, 1> on the current stream with `smem` bytes.
#define EPIC_LAUNCH_STREAM(KERNEL, OP, SMEM, N, ...)                                           \
  do {                                                                                         \
    auto launch = [&](auto kernel) {                                                           \
      cuda::prepare_shared_memory(kernel, SMEM, OP, N);                                        \
      kernel<<<static_cast<unsigned>(B * a.n_slices), kThreads, SMEM,                          \
               at::cuda::getCurrentCUDAStream()>>>(a, __VA_ARGS__);                            \
      C10_CUDA_KERNEL_LAUNCH_CHECK();                                                          \
    };                                                                                         \
    if (vec)                                                                                   \
      launch(KERNEL<scalar_t, 16 / sizeof(scalar_t)>);                                         \
    else                                                                                       \
      launch(KERNEL<scalar_t, 1>);                                                             \
  } while (0)

}  // namespace

at::Tensor gather_merge_cuda(const at::Tensor& tokens_in, const at::Tensor& idx,
                             const std::optional<at::Tensor>& counts, int64_t merge,
                             const std::optional<at::Tensor>& weights) {
  check_gather_merge_inputs(tokens_in, idx, counts, merge, weights);
  check_cuda_tensor(tokens_in, "tokens");
  const int64_t B = tokens_in.size(0), N = tokens_in.size(1), D = tokens_in.size(2);
  const int64_t K = idx.size(1);
  check_int_range(N, "N");
  check_int_range(K, "K");
  const c10::cuda::CUDAGuard guard(tokens_in.device());
  auto out = new_output({B, K + (merge != kMergeNone), D}, tokens_in.options());
  if (out.numel() == 0) return out;
  const at::Tensor tokens = unit_inner_stride(tokens_in);
  const at::Tensor ic = idx.contiguous();
  const at::Tensor cc = counts.has_value() ? counts->contiguous() : at::Tensor();
  const at::Tensor wf = opmath_weights(weights, merge, tokens_in.scalar_type());
  const size_t smem = static_cast<size_t>((N + 31) / 32) * sizeof(uint32_t);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, tokens.scalar_type(), "gather_merge_cuda", [&] {
    bool vec;
    const StreamArgs<scalar_t> a = stream_args<scalar_t>(tokens, out, wf, N, merge, &vec);
    EPIC_LAUNCH_STREAM(gather_merge_kernel, "gather_merge", smem, N, ic.data_ptr<int64_t>(),
                       static_cast<int>(K), cc.defined() ? cc.data_ptr<int64_t>() : nullptr);
  });
  return out;
}

at::Tensor gather_merge_backward_cuda(const at::Tensor& grad_in, const at::Tensor& idx,
                                      const std::optional<at::Tensor>& counts, int64_t merge,
                                      const std::optional<at::Tensor>& weights, int64_t n_tokens) {
  check_gather_merge_backward_inputs(grad_in, idx, counts, merge, weights, n_tokens);
  check_cuda_tensor(grad_in, "grad_out");
  const int64_t B = grad_in.size(0), D = grad_in.size(2), K = idx.size(1);
  check_int_range(n_tokens, "n_tokens");
  TORCH_CHECK_VALUE(K < kRepeated, "idx: K = ", K, " is too large for the cuda backend");
  const c10::cuda::CUDAGuard guard(grad_in.device());
  auto gx = new_output({B, n_tokens, D}, grad_in.options());
  if (gx.numel() == 0) return gx;
  const at::Tensor g = unit_inner_stride(grad_in);
  const at::Tensor ic = idx.contiguous();
  const at::Tensor cc = counts.has_value() ? counts->contiguous() : at::Tensor();
  const at::Tensor wf = opmath_weights(weights, merge, grad_in.scalar_type());
  const size_t smem = static_cast<size_t>(n_tokens) * sizeof(int);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), "gather_merge_backward_cuda", [&] {
    bool vec;
    const StreamArgs<scalar_t> a = stream_args<scalar_t>(g, gx, wf, n_tokens, merge, &vec);
    EPIC_LAUNCH_STREAM(gather_merge_backward_kernel, "gather_merge_backward", smem, n_tokens,
                       ic.data_ptr<int64_t>(), static_cast<int>(K),
                       cc.defined() ? cc.data_ptr<int64_t>() : nullptr);
  });
  return gx;
}

std::tuple<at::Tensor, at::Tensor> compress_topk_cuda(const at::Tensor& tokens_in,
                                                      const at::Tensor& scores_in, int64_t k,
                                                      int64_t merge,
                                                      const std::optional<at::Tensor>& weights) {
  check_compress_inputs(tokens_in, scores_in, k, merge, weights);
  check_cuda_tensor(tokens_in, "tokens");
  const int64_t B = tokens_in.size(0), N = tokens_in.size(1), D = tokens_in.size(2);
  check_int_range(N, "N");
  const c10::cuda::CUDAGuard guard(tokens_in.device());
  auto out = new_output({B, k + (merge != kMergeNone), D}, tokens_in.options());
  auto idx = new_output({B, k}, tokens_in.options().dtype(at::kLong));
  if (B == 0 || (out.numel() == 0 && idx.numel() == 0)) return {out, idx};
  // D == 0 with k > 0 still runs (one slice, no columns) to produce idx.
  const at::Tensor scores = scores_as_float(scores_in);
  const at::Tensor tokens = unit_inner_stride(tokens_in);
  const at::Tensor wf = opmath_weights(weights, merge, tokens_in.scalar_type());
  const size_t smem = static_cast<size_t>(N + (N + 31) / 32) * sizeof(uint32_t);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, tokens.scalar_type(), "compress_topk_cuda", [&] {
    bool vec;
    const StreamArgs<scalar_t> a = stream_args<scalar_t>(tokens, out, wf, N, merge, &vec);
    EPIC_LAUNCH_STREAM(compress_kernel, "compress_topk", smem, N, scores.data_ptr<float>(),
                       scores.stride(0), scores.stride(1), static_cast<int>(k),
                       idx.data_ptr<int64_t>());
  });
  return {out, idx};
}

}  // namespace epic
