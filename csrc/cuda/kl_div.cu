// CUDA kernel of the teacher-student KL divergence: per-row loss and student gradient in one
// launch, plus a fixed-order reduction of the row losses. Same contract as kl_div_cpu (ops.h).
//
// Grid: one row per group of G threads: G = 32 (a warp, 8 rows per 256-thread block) for short
// rows, G = 128 or 512 (a whole block) otherwise. Each thread owns every G-th 16-byte pack of the
// row (8 bf16/fp16, 4 fp32, 2 fp64 logits; entries before the first 16-byte boundary and after the
// last full pack are taken one by one), U packs in flight per tensor.
//   pass 1 reads student and teacher once and keeps the online state of kl_device.cuh in fp32
//          registers (fp64 for fp64 logits): maxima, sums of exponentials, the anchor and s,
//          rescaled when a group of U packs raises a maximum;
//   reduce: butterfly merge over the warp (fp32), then, for G > 32, the warps' states merged by
//          warp 0 (fp64 sums); the row's loss (tau^2 KL) is formed in fp64 and stored per row;
//   pass 2 re-reads the row, last pack first (the end of the row read in pass 1 is the part most
//          likely still in L2), and writes the gradient once, in the logits' dtype:
//            forward: tau (p_s - p_t) * scale
//            reverse: tau p_s (log p_s - log p_t - KL) * scale, the difference in fp64
// A kept row whose softmax is undefined (a NaN or +inf logit on either side, or one side all -inf:
// then a final sum z is NaN or 0) gets loss NaN and an all-NaN gradient row (NaN pass-2 constants).
// scale = 1 / normaliser for kept rows (the count of kept rows is summed on the device from the
// mask and read by every block: no host synchronisation); masked-out rows get loss 0 and a zero
// gradient row. Reductions other than none: the row losses go to an fp64 [T] buffer that two small
// kernels sum in a fixed order (deterministic), then divide by the normaliser on the device.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <algorithm>
#include <climits>
#include <cstdint>
#include <type_traits>

#include "epic/checks.h"
#include "epic/common.h"
#include "epic/ops.h"
#include "kl_device.cuh"
#include "reduce.cuh"

namespace epic {

namespace {

using cuda::kl::Conv;
using cuda::kl::Io;
using cuda::kl::Math;
using cuda::kl::State;

template <typename T>
struct KlArgs {
  const T* s;  // student logits [T, V], unit last stride
  const T* t;  // teacher logits
  T* g;        // gradient rows (null when not computed); may be s itself (inplace)
  int64_t ss, ts, gs;  // row strides in elements
  int64_t rows;
  int V;
  const bool* mask;     // [T] or null
  const int64_t* kept;  // device count of kept rows, or null: every row is kept
  float* loss_f;        // reduction none: [T] fp32 output
  double* loss_d;       // otherwise: [T] fp64 scratch
  double tau;
  int reduction;
  bool reverse;
};

// What pass 2 needs of a row.
template <typename A>
struct RowConsts {
  A ma, mb;      // student / teacher maxima (raw logits)
  A qa;          // reverse: the (safe) anchor, teacher logit at the student's argmax
  A k1, k2;      // forward: tau scale / z_s, tau scale / z_t; reverse: k1 = tau scale / z_s,
                 // k2 = the gradient of a massless entry (0, NaN in an undefined row)
  double l0;     // reverse: log p_s - log p_t = d / tau + l0 - 1 (fp64)
  double kl;     // reverse: KL of the row + 1 (fp64, without the tau^2)
  double inv_tau;
};

// Row loss (fp64) and pass-2 constants from the merged state of a whole row.
template <typename A, typename V>
__device__ __forceinline__ double row_finals(const State<V>& st, double tau, double scale,
                                             bool reverse, RowConsts<A>& rc) {
  const double zp = static_cast<double>(st.zp), zq = static_cast<double>(st.zq);
  const double s = static_cast<double>(st.s);
  const double qa = static_cast<double>(cuda::kl::safe(st.qa));
  // Both sums finite and positive (>= 1: the maximum's own term), else the softmax of a side is
  // undefined (z NaN from a NaN / +inf logit, z = 0 for all -inf): NaN loss and gradient row,
  // as on the CPU (V = 0 is handled by the host). NaN fails every comparison.
  const bool defined = zp > 0.0 && zq > 0.0 && isfinite(zp) && isfinite(zq);
  const double nan = cuda::kl::quiet_nan<double>();
  // (mq - qa): exact in fp64. l0 = log-ratio of the anchor entry.
  const double l0 = (static_cast<double>(st.mq) - qa) / tau + log(zq / zp);
  const double kl = defined ? (s / zp) / tau + l0 : nan;
  // Reverse gradient: lr - KL = (d / tau + l0 + 1) - (KL + 1) in fp64. The + 1 makes differences
  // below fp64 resolution of log-probabilities cancel to exactly 0, as in the fp64 autograd
  // reference and the CPU kernel (an argmax entry of a one-hot student gets exactly 0); it
  // changes nothing above ~1e-16 * p_s.
  rc.inv_tau = 1.0 / tau;
  rc.l0 = l0 + 1.0;
  rc.kl = kl + 1.0;
  if (reverse) {  // P = student, Q = teacher
    rc.ma = static_cast<A>(st.mp);
    rc.mb = static_cast<A>(st.mq);
    rc.qa = static_cast<A>(qa);
    rc.k1 = static_cast<A>(tau * scale / zp);
    rc.k2 = A(0);
  } else {  // P = teacher, Q = student
    rc.ma = static_cast<A>(st.mq);
    rc.mb = static_cast<A>(st.mp);
    rc.qa = A(0);
    rc.k1 = static_cast<A>(tau * scale / zq);
    rc.k2 = static_cast<A>(tau * scale / zp);
  }
  if (!defined) {  // every gradient entry NaN: forward multiplies by k1, k2; reverse returns k2
    rc.k1 = static_cast<A>(nan);
    rc.k2 = static_cast<A>(nan);
  }
  return tau * tau * kl;
}

// Entries of one row as seen by thread `tid` of its group: head [0, h) one by one, nv packs from
// h (16-byte aligned), tail [h + nv VEC, V) one by one.
struct RowSplit {
  int h, nv, tail0, nt;
};

template <typename T, int VEC>
__device__ __forceinline__ RowSplit split_row(const T* row, int V) {
  RowSplit r;
  if (VEC == 1) {
    r.h = 0;
  } else {
    const int mis = static_cast<int>((reinterpret_cast<uintptr_t>(row) / sizeof(T)) % VEC);
    r.h = min(V, (VEC - mis) % VEC);
  }
  r.nv = (V - r.h) / VEC;
  r.tail0 = r.h + r.nv * VEC;
  r.nt = V - r.tail0;
  return r;
}

// One logit i of a row, in the accumulation type (head and tail entries).
template <typename T>
__device__ __forceinline__ acc_of<T> load_one(const T* row, int i) {
  acc_of<T> o[1];
  Conv<T>::unpack(Io<T, 1>::load(row + i), o);
  return o[0];
}

// Pass 1 over the entries of thread `tid`: P = target side, Q = other side.
template <typename T, int VEC, int U, int G, typename A>
__device__ __forceinline__ void row_pass1(const T* P, const T* Q, const RowSplit& sp, int tid,
                                          A c, State<A>& st) {
  using M = Math<A>;
  using R = typename Io<T, VEC>::R;
  if (tid < sp.h) {
    const A p[1] = {load_one(P, tid)}, q[1] = {load_one(Q, tid)};
    cuda::kl::accumulate<M>(st, p, q, c);
  }
  const T* Pb = P + sp.h;
  const T* Qb = Q + sp.h;
  for (int k0 = tid; k0 < sp.nv; k0 += U * G) {
    R pr[U], qr[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int k = k0 + u * G;
      if (k < sp.nv) {
        pr[u] = Io<T, VEC>::load(Pb + static_cast<int64_t>(k) * VEC);
        qr[u] = Io<T, VEC>::load(Qb + static_cast<int64_t>(k) * VEC);
      }
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      if (k0 + u * G < sp.nv) {  // one pack at a time: few live registers
        A p[VEC], q[VEC];
        Conv<T>::unpack(pr[u], p);
        Conv<T>::unpack(qr[u], q);
        cuda::kl::accumulate<M>(st, p, q, c);
      }
    }
  }
  if (tid < sp.nt) {
    const A p[1] = {load_one(P, sp.tail0 + tid)}, q[1] = {load_one(Q, sp.tail0 + tid)};
    cuda::kl::accumulate<M>(st, p, q, c);
  }
}

// f applied to every (student, teacher) pair of two raw packs, in place per 32-bit word for the
// 16-bit types (fewer live registers than unpacking whole packs).
template <typename T, typename R, typename F>
__device__ __forceinline__ R map_pack(const R& s, const R& t, F f) {
  if constexpr (sizeof(T) == 2 && std::is_same_v<R, uint4>) {
    return {Conv<T>::map2(s.x, t.x, f), Conv<T>::map2(s.y, t.y, f), Conv<T>::map2(s.z, t.z, f),
            Conv<T>::map2(s.w, t.w, f)};
  } else {
    constexpr int N = static_cast<int>(sizeof(R) / sizeof(T));
    acc_of<T> a[N], b[N];
    Conv<T>::unpack(s, a);
    Conv<T>::unpack(t, b);
#pragma unroll
    for (int e = 0; e < N; ++e) a[e] = f(a[e], b[e]);
    return Conv<T>::pack(a);
  }
}

// Pass 2: g = f(student, teacher) for every entry of thread `tid`, packs in descending order.
template <typename T, int VEC, int U, int G, typename F>
__device__ __forceinline__ void row_pass2(const T* s, const T* t, T* g, const RowSplit& sp,
                                          int tid, F f) {
  using A = acc_of<T>;
  using R = typename Io<T, VEC>::R;
  if (tid < sp.h) {
    const A o[1] = {f(load_one(s, tid), load_one(t, tid))};
    Io<T, 1>::store(g + tid, Conv<T>::pack(o));
  }
  const T* sb = s + sp.h;
  const T* tb = t + sp.h;
  T* gb = g + sp.h;
  for (int k0 = sp.nv - 1 - tid; k0 >= 0; k0 -= U * G) {
    R sr[U], tr[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int k = k0 - u * G;
      if (k >= 0) {
        sr[u] = Io<T, VEC>::load_last(sb + static_cast<int64_t>(k) * VEC);
        tr[u] = Io<T, VEC>::load_last(tb + static_cast<int64_t>(k) * VEC);
      }
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int k = k0 - u * G;
      if (k >= 0)
        Io<T, VEC>::store(gb + static_cast<int64_t>(k) * VEC, map_pack<T>(sr[u], tr[u], f));
    }
  }
  if (tid < sp.nt) {
    const int i = sp.tail0 + tid;
    const A o[1] = {f(load_one(s, i), load_one(t, i))};
    Io<T, 1>::store(g + i, Conv<T>::pack(o));
  }
}

template <typename T, int VEC, int G>
__device__ __forceinline__ void zero_row(T* g, const RowSplit& sp, int tid) {
  using A = acc_of<T>;
  A z1[1] = {A(0)}, zv[VEC];
#pragma unroll
  for (int e = 0; e < VEC; ++e) zv[e] = A(0);
  if (tid < sp.h) Io<T, 1>::store(g + tid, Conv<T>::pack(z1));
  T* gb = g + sp.h;
  for (int k = tid; k < sp.nv; k += G)
    Io<T, VEC>::store(gb + static_cast<int64_t>(k) * VEC, Conv<T>::pack(zv));
  if (tid < sp.nt) Io<T, 1>::store(g + sp.tail0 + tid, Conv<T>::pack(z1));
}

// Packs of one tensor in flight per thread per step: 32 bytes, or 8 entries when packs are small.
template <int VEC>
constexpr int kUnrollOf = VEC >= 4 ? 2 : 8 / VEC;

// Rows of G threads; BLOCK = 256 with G = 32, else BLOCK = G (one row per block).
template <typename T, int VEC, int G, int BLOCK>
__global__ void __launch_bounds__(BLOCK, 1024 / BLOCK) kl_div_rows_kernel(const KlArgs<T> a) {
  using A = acc_of<T>;
  using M = Math<A>;
  constexpr int U = kUnrollOf<VEC>;
  constexpr int NW = G / 32;  // warps per row
  static_assert(G == 32 || G == BLOCK, "a row is one warp or one whole block");
  static_assert(NW <= 32, "at most 32 warps per row");
  __shared__ double red[6][NW > 1 ? NW : 1];
  __shared__ RowConsts<A> rcs;

  const int tid = threadIdx.x % G, lane = threadIdx.x & 31, warp = tid >> 5;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * (BLOCK / G) + threadIdx.x / G;
  if (row >= a.rows) return;  // only with G = 32: a whole warp, no block barrier follows
  const bool keep = a.mask == nullptr || a.mask[row];  // uniform over the row's threads
  const T* srow = a.s + row * a.ss;
  const T* trow = a.t + row * a.ts;
  T* grow = a.g != nullptr ? a.g + row * a.gs : nullptr;
  const RowSplit sp = split_row<T, VEC>(srow, a.V);  // same split for t and g (host checks)

  if (!keep) {
    if (tid == 0) {
      if (a.loss_f != nullptr) a.loss_f[row] = 0.0f;
      else a.loss_d[row] = 0.0;
    }
    if (grow != nullptr) zero_row<T, VEC, G>(grow, sp, tid);
    return;  // uniform over the row: for G = BLOCK the whole block leaves together
  }

  const double tau = a.tau;
  const A c = static_cast<A>(M::kUnit / tau);
  const bool rev = a.reverse;
  State<A> st = cuda::kl::empty_state<A>();
  row_pass1<T, VEC, U, G>(rev ? srow : trow, rev ? trow : srow, sp, tid, c, st);
  st = cuda::kl::butterfly<M>(st, c, 32);

  double scale = 1.0;
  if (a.reduction != kReduceNone && a.reduction != kReduceSum) {
    const double kept =
        a.kept != nullptr ? static_cast<double>(*a.kept) : static_cast<double>(a.rows);
    const double norm = a.reduction == kReduceMean ? kept * static_cast<double>(a.V) : kept;
    scale = norm > 0 ? 1.0 / norm : 0.0;
  }

  RowConsts<A> rc;
  if constexpr (NW == 1) {
    st = cuda::kl::shfl_state(st, 0);  // every lane uses lane 0's bits
    const double loss = row_finals<A>(st, tau, scale, rev, rc);
    if (lane == 0) {
      if (a.loss_f != nullptr) a.loss_f[row] = static_cast<float>(loss);
      else a.loss_d[row] = loss;
    }
  } else {
    if (lane == 0) {
      red[0][warp] = static_cast<double>(st.mp);
      red[1][warp] = static_cast<double>(st.zp);
      red[2][warp] = static_cast<double>(st.mq);
      red[3][warp] = static_cast<double>(st.zq);
      red[4][warp] = static_cast<double>(st.qa);
      red[5][warp] = static_cast<double>(st.s);
    }
    __syncthreads();
    if (warp == 0) {
      State<double> w = cuda::kl::empty_state<double>();
      if (lane < NW)
        w = {red[0][lane], red[1][lane], red[2][lane], red[3][lane], red[4][lane], red[5][lane]};
      w = cuda::kl::butterfly<M>(w, static_cast<double>(c), NW);
      if (lane == 0) {
        RowConsts<A> r0;
        const double loss = row_finals<A>(w, tau, scale, rev, r0);
        rcs = r0;
        if (a.loss_f != nullptr) a.loss_f[row] = static_cast<float>(loss);
        else a.loss_d[row] = loss;
      }
    }
    __syncthreads();
    rc = rcs;
  }

  if (grow == nullptr) return;
  if (!rev) {
    const A ma = rc.ma, mb = rc.mb, k1 = rc.k1, k2 = rc.k2;
    row_pass2<T, VEC, U, G>(srow, trow, grow, sp, tid, [=](A sv, A tv) {
      return cuda::mul_rn(M::ex((sv - ma) * c), k1) - cuda::mul_rn(M::ex((tv - mb) * c), k2);
    });
  } else {
    // tau scale p_s (lr - KL), lr = log p_s - log p_t, the difference taken in fp64 (see
    // row_finals); every term keeps fp32 accuracy.
    const A ma = rc.ma, qa = rc.qa, k1 = rc.k1, k2 = rc.k2;
    const double l0 = rc.l0, kl = rc.kl, inv_tau = rc.inv_tau;
    row_pass2<T, VEC, U, G>(srow, trow, grow, sp, tid, [=](A sv, A tv) {
      const A ua = sv - ma;
      const A ea = M::ex(ua * c);
      const A d = ua - (tv - qa);  // the log-ratio of pass 1
      const A lr = static_cast<A>(fma(static_cast<double>(d), inv_tau, l0) - kl);
      return ea > A(0) ? (ea * k1) * lr : k2;  // k2: 0, or NaN in an undefined row
    });
  }
}

// ---- fixed-order sum of the fp64 row losses

constexpr int kSumThreads = 256;

__global__ void __launch_bounds__(kSumThreads) kl_sum_chunks_kernel(const double* __restrict__ rl,
                                                                    int64_t n, int64_t chunk,
                                                                    double* __restrict__ part) {
  __shared__ double red[kSumThreads / 32];
  const int64_t lo = static_cast<int64_t>(blockIdx.x) * chunk;
  const int64_t hi = std::min(n, lo + chunk);
  double acc = 0.0;
  for (int64_t i = lo + threadIdx.x; i < hi; i += kSumThreads) acc += rl[i];
  const double total = cuda::block_sum(acc, red);
  if (threadIdx.x == 0) part[blockIdx.x] = total;
}

__global__ void __launch_bounds__(kSumThreads) kl_finish_kernel(const double* __restrict__ part,
                                                                int nparts,
                                                                const int64_t* __restrict__ kept,
                                                                int64_t rows, int64_t V,
                                                                int reduction, float* out) {
  __shared__ double red[kSumThreads / 32];
  double acc = 0.0;
  for (int i = threadIdx.x; i < nparts; i += kSumThreads) acc += part[i];
  const double total = cuda::block_sum(acc, red);
  if (threadIdx.x == 0) {
    const double k = kept != nullptr ? static_cast<double>(*kept) : static_cast<double>(rows);
    const double norm = reduction == kReduceBatchMean ? k
                        : reduction == kReduceMean    ? k * static_cast<double>(V)
                                                      : 1.0;
    out[0] = norm > 0 ? static_cast<float>(total / norm) : 0.0f;
  }
}

// ---- host side

template <typename T, int VEC, int G, int BLOCK>
void launch_rows_kernel(const KlArgs<T>& a) {
  constexpr int64_t kRows = BLOCK / G;
  const int64_t blocks = (a.rows + kRows - 1) / kRows;
  TORCH_CHECK_VALUE(blocks <= INT_MAX, "kl_div: T = ", a.rows,
                    " rows is too large for the cuda backend");
  kl_div_rows_kernel<T, VEC, G, BLOCK>
      <<<static_cast<unsigned>(blocks), BLOCK, 0, at::cuda::getCurrentCUDAStream()>>>(a);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Threads per row from the number of packs: a warp up to 8 packs per lane, then 128 or 512.
template <typename T, int VEC>
void launch_rows(const KlArgs<T>& a) {
  const int64_t packs = a.V / VEC;
  if (packs <= 32 * 8)
    launch_rows_kernel<T, VEC, 32, 256>(a);
  else if (packs <= 128 * 16)
    launch_rows_kernel<T, VEC, 128, 128>(a);
  else
    launch_rows_kernel<T, VEC, 512, 512>(a);
}

// 16-byte packs are used when student, teacher and gradient rows all reach a 16-byte boundary
// after the same number of entries (then split_row of the student row fits all three).
template <typename T>
bool can_use_packs(const KlArgs<T>& a) {
  constexpr int64_t kVec = 16 / sizeof(T);
  auto mis = [](const void* p) { return reinterpret_cast<uintptr_t>(p) % 16; };
  if (a.V == 0 || mis(a.s) % sizeof(T) != 0) return false;
  if (mis(a.s) != mis(a.t) || (a.ss - a.ts) % kVec != 0) return false;
  if (a.g != nullptr && (mis(a.s) != mis(a.g) || (a.ss - a.gs) % kVec != 0)) return false;
  return true;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> kl_div_cuda(const at::Tensor& student_in,
                                               const at::Tensor& teacher_in,
                                               const std::optional<at::Tensor>& row_mask,
                                               double temperature, int64_t reduction, bool reverse,
                                               bool compute_grad, bool inplace) {
  check_kl_inputs(student_in, teacher_in, row_mask, temperature, reduction, inplace);
  check_cuda_tensor(student_in, "student logits");
  const int64_t T = student_in.size(0), V = student_in.size(1);
  TORCH_CHECK_VALUE(V < INT_MAX, "kl_div: V = ", V, " is too large for the cuda backend");
  const c10::cuda::CUDAGuard guard(student_in.device());
  const at::Tensor student = unit_inner_stride(student_in);
  const at::Tensor teacher = unit_inner_stride(teacher_in);
  const auto f32 = student.options().dtype(at::kFloat);

  at::Tensor grad;
  if (compute_grad) grad = inplace ? student_in : new_output({T, V}, student.options());
  at::Tensor loss = reduction == kReduceNone ? new_output({T}, f32) : new_output({}, f32);
  at::Tensor mask, kept;
  if (row_mask.has_value()) {
    mask = row_mask->contiguous();
    kept = mask.sum(at::kLong);  // on the device: never read by the host
  }
  at::Tensor row_loss;
  if (reduction != kReduceNone) row_loss = at::empty({T}, student.options().dtype(at::kDouble));

  if (V == 0) {  // every row's KL is an empty sum: 0, as on the CPU and in the reference
    loss.zero_();
    return {loss, compute_grad ? grad : at::empty({0}, student.options())};
  }
  if (T > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, student.scalar_type(), "kl_div_cuda", [&] {
      KlArgs<scalar_t> a;
      a.s = student.data_ptr<scalar_t>();
      a.t = teacher.data_ptr<scalar_t>();
      a.g = compute_grad && grad.numel() > 0 ? grad.data_ptr<scalar_t>() : nullptr;
      a.ss = T > 1 ? student.stride(0) : 0;
      a.ts = T > 1 ? teacher.stride(0) : 0;
      a.gs = a.g != nullptr && T > 1 ? grad.stride(0) : 0;
      a.rows = T;
      a.V = static_cast<int>(V);
      a.mask = mask.defined() ? mask.data_ptr<bool>() : nullptr;
      a.kept = kept.defined() ? kept.data_ptr<int64_t>() : nullptr;
      a.loss_f = reduction == kReduceNone ? loss.data_ptr<float>() : nullptr;
      a.loss_d = reduction == kReduceNone ? nullptr : row_loss.data_ptr<double>();
      a.tau = temperature;
      a.reduction = static_cast<int>(reduction);
      a.reverse = reverse;
      if (can_use_packs(a))
        launch_rows<scalar_t, 16 / sizeof(scalar_t)>(a);
      else
        launch_rows<scalar_t, 1>(a);
    });
  }

  if (reduction != kReduceNone) {
    const int64_t nparts = std::clamp<int64_t>((T + 4095) / 4096, 1, 1024);
    const int64_t chunk = (T + nparts - 1) / nparts;
    at::Tensor part = at::empty({nparts}, student.options().dtype(at::kDouble));
    const auto stream = at::cuda::getCurrentCUDAStream();
    kl_sum_chunks_kernel<<<static_cast<unsigned>(nparts), kSumThreads, 0, stream>>>(
        row_loss.data_ptr<double>(), T, chunk, part.data_ptr<double>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    kl_finish_kernel<<<1, kSumThreads, 0, stream>>>(
        part.data_ptr<double>(), static_cast<int>(nparts),
        kept.defined() ? kept.data_ptr<int64_t>() : nullptr, T, V, static_cast<int>(reduction),
        loss.data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  if (!compute_grad) grad = at::empty({0}, student.options());
  return {loss, grad};
}

}  // namespace epic
