// CPU kernels of the gather + merge family and the fused compress (top-k + gather + merge).
//
// Work split: phase 1 runs per image (validate idx, mark referenced rows, count dropped rows, or
// select the top-k for compress); phase 2 runs per (image, slice of D) so that even B = 1 keeps
// every core busy. In phase 2 each input row slice is read once: referenced rows are copied to
// their output slots, the others are accumulated in an fp32 slice that stays in L1.
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "cpu_kernels.h"
#include "epic/checks.h"
#include "epic/ops.h"

namespace epic {

namespace {

constexpr int64_t kSlice = 512;  // fp32 accumulator slice: 2 KiB, lives in L1
// Dropped rows are summed as a three-level cascade: kMergeBlock rows into `part`, kMergeBlock
// parts into `mid`, mids into the total, so the rounding error grows with 2 kMergeBlock +
// N / kMergeBlock^2 additions instead of N (a sequential fp32 sum of 8192 rows erred ~15x more
// than torch's own reduction of the same terms).
constexpr int64_t kMergeBlock = 16;

// Rows per task of the per-image phase: waking the OpenMP team costs more than selecting a few
// thousand scores, so small batches run on the calling thread.
inline int64_t rows_grain(int64_t n_per_row) { return std::max<int64_t>(1, 65536 / std::max<int64_t>(n_per_row, 1)); }

using acc_t = float;

// Per-image bookkeeping produced by phase 1.
struct Plan {
  int64_t B, N, K;
  std::vector<int64_t> valid;       // number of valid idx entries per image
  std::vector<int64_t> first_slot;  // [B*N]: first j with idx[b,j] == n, else -1
  std::vector<int64_t> n_dropped;   // rows referenced by no valid idx
  std::vector<int64_t> next_slot;   // [B*K] (backward only): next j' > j with the same idx, else -1
};

// Phase 1 for a user-given idx: validate and mark referenced rows; with_repeats also chains the
// slots of each row (the backward sums a repeated row's gradients in one accumulator).
Plan plan_from_idx(const at::Tensor& idx, const std::optional<at::Tensor>& counts, int64_t N,
                   bool with_repeats) {
  Plan p{idx.size(0), N, idx.size(1), {}, {}, {}, {}};
  p.valid.assign(p.B, p.K);
  p.first_slot.assign(p.B * N, -1);
  p.n_dropped.assign(p.B, N);
  if (with_repeats) p.next_slot.assign(p.B * p.K, -1);
  const at::Tensor ic = idx.contiguous();
  const int64_t* ip = ic.data_ptr<int64_t>();
  if (counts.has_value()) {
    const at::Tensor cc = counts->contiguous();
    const int64_t* cp = cc.data_ptr<int64_t>();
    for (int64_t b = 0; b < p.B; ++b) {
      TORCH_CHECK_VALUE(cp[b] >= 0 && cp[b] <= p.K, "counts[", b, "] = ", cp[b],
                        " is outside [0, K] = [0, ", p.K, "]");
      p.valid[b] = cp[b];
    }
  }
  at::parallel_for(0, p.B, rows_grain(N + p.K), [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      int64_t* fs = p.first_slot.data() + b * N;
      int64_t* nx = with_repeats ? p.next_slot.data() + b * p.K : nullptr;
      int64_t distinct = 0;
      // Backwards, so that fs[n] ends at the first slot and each slot links to the next one.
      for (int64_t j = p.valid[b] - 1; j >= 0; --j) {
        const int64_t n = ip[b * p.K + j];
        TORCH_CHECK_VALUE(n >= 0 && n < N, "idx[", b, ", ", j, "] = ", n,
                          " is out of range for N = ", N);
        if (fs[n] < 0) ++distinct;
        if (nx != nullptr) nx[j] = fs[n];
        fs[n] = j;
      }
      p.n_dropped[b] = N - distinct;
    }
  });
  return p;
}

template <typename T>
inline void accumulate(acc_t* acc, const T* x, int64_t len) {
  for (int64_t d = 0; d < len; ++d) acc[d] += static_cast<acc_t>(x[d]);
}
template <typename T>
inline void accumulate_scaled(acc_t* acc, const T* x, acc_t w, int64_t len) {
  for (int64_t d = 0; d < len; ++d) acc[d] += w * static_cast<acc_t>(x[d]);
}
inline void accumulate(double* acc, const double* x, int64_t len) {
  for (int64_t d = 0; d < len; ++d) acc[d] += x[d];
}
inline void accumulate_scaled(double* acc, const double* x, double w, int64_t len) {
  for (int64_t d = 0; d < len; ++d) acc[d] += w * x[d];
}

template <typename A>
inline void add_and_clear(A* dst, A* src, int64_t len) {
  for (int64_t d = 0; d < len; ++d) { dst[d] += src[d]; src[d] = A(0); }
}

// Phase 2 of the forward: out[b, :valid] = kept rows, out[b, valid] = merge, rest zero.
template <typename T>
void gather_merge_rows(const Plan& p, const int64_t* idx, const T* x, int64_t xsb, int64_t xsn,
                       const acc_of<T>* w, int64_t D, int64_t merge, T* out) {
  using opmath = acc_of<T>;
  const int64_t rows_out = p.K + (merge != kMergeNone);
  const int64_t n_slices = (D + kSlice - 1) / kSlice;
  at::parallel_for(0, p.B * n_slices, 1, [&](int64_t t0, int64_t t1) {
    opmath acc[kSlice], mid[kSlice], part[kSlice];
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = t / n_slices;
      const int64_t d0 = (t % n_slices) * kSlice;
      const int64_t len = std::min(kSlice, D - d0);
      const T* xb = x + b * xsb + d0;
      T* ob = out + b * rows_out * D + d0;
      const int64_t valid = p.valid[b];
      for (int64_t j = 0; j < valid; ++j)
        std::memcpy(ob + j * D, xb + idx[b * p.K + j] * xsn, len * sizeof(T));
      int64_t next = valid;
      if (merge != kMergeNone) {
        std::fill(acc, acc + len, opmath(0));
        std::fill(mid, mid + len, opmath(0));
        std::fill(part, part + len, opmath(0));
        const int64_t* fs = p.first_slot.data() + b * p.N;
        int64_t in_part = 0, in_mid = 0;
        for (int64_t n = 0; n < p.N; ++n) {
          if (fs[n] >= 0) continue;
          if (merge == kMergeMean)
            accumulate(part, xb + n * xsn, len);
          else
            accumulate_scaled(part, xb + n * xsn, w[b * p.N + n], len);
          if (++in_part < kMergeBlock) continue;
          add_and_clear(mid, part, len);
          in_part = 0;
          if (++in_mid < kMergeBlock) continue;
          add_and_clear(acc, mid, len);
          in_mid = 0;
        }
        add_and_clear(mid, part, len);
        add_and_clear(acc, mid, len);
        T* m = ob + valid * D;
        if (merge == kMergeMean && p.n_dropped[b] > 0) {
          const opmath cnt = static_cast<opmath>(p.n_dropped[b]);
          for (int64_t d = 0; d < len; ++d) m[d] = static_cast<T>(acc[d] / cnt);
        } else {
          for (int64_t d = 0; d < len; ++d) m[d] = static_cast<T>(acc[d]);
        }
        ++next;
      }
      for (int64_t j = next; j < rows_out; ++j) std::memset(ob + j * D, 0, len * sizeof(T));
    }
  });
}

// Phase 2 of the backward: every input row is written exactly once; a row that idx repeats gets
// the sum of its slots' gradients, accumulated in opmath and rounded once (as the reference).
template <typename T>
void gather_merge_backward_rows(const Plan& p, const T* g, int64_t gsb, int64_t gsn,
                                const acc_of<T>* w, int64_t D, int64_t merge, T* gx) {
  using opmath = acc_of<T>;
  const int64_t n_slices = (D + kSlice - 1) / kSlice;
  at::parallel_for(0, p.B * n_slices, 1, [&](int64_t t0, int64_t t1) {
    opmath acc[kSlice];
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = t / n_slices;
      const int64_t d0 = (t % n_slices) * kSlice;
      const int64_t len = std::min(kSlice, D - d0);
      const T* gb = g + b * gsb + d0;
      T* xb = gx + b * p.N * D + d0;
      const int64_t valid = p.valid[b];
      const T* gm = gb + valid * gsn;  // grad of the merged row
      const int64_t* fs = p.first_slot.data() + b * p.N;
      const int64_t* nx = p.next_slot.data() + b * p.K;
      const opmath cnt = static_cast<opmath>(std::max<int64_t>(p.n_dropped[b], 1));
      for (int64_t n = 0; n < p.N; ++n) {
        T* dst = xb + n * D;
        const int64_t j0 = fs[n];
        if (j0 >= 0 && nx[j0] < 0) {
          std::memcpy(dst, gb + j0 * gsn, len * sizeof(T));
        } else if (j0 >= 0) {
          const T* src = gb + j0 * gsn;
          for (int64_t d = 0; d < len; ++d) acc[d] = static_cast<opmath>(src[d]);
          for (int64_t j = nx[j0]; j >= 0; j = nx[j]) accumulate(acc, gb + j * gsn, len);
          for (int64_t d = 0; d < len; ++d) dst[d] = static_cast<T>(acc[d]);
        } else if (merge == kMergeMean) {
          for (int64_t d = 0; d < len; ++d) dst[d] = static_cast<T>(static_cast<opmath>(gm[d]) / cnt);
        } else if (merge == kMergeWeighted) {
          const opmath wn = w[b * p.N + n];
          for (int64_t d = 0; d < len; ++d) dst[d] = static_cast<T>(wn * static_cast<opmath>(gm[d]));
        } else {
          std::memset(dst, 0, len * sizeof(T));
        }
      }
    }
  });
}

// Weights in the accumulation type of the tokens (fp64 for fp64 tokens, else fp32).
at::Tensor opmath_weights(const std::optional<at::Tensor>& weights, int64_t merge,
                          at::ScalarType tokens_dtype) {
  if (merge != kMergeWeighted) return at::Tensor();
  return weights->to(tokens_dtype == at::kDouble ? at::kDouble : at::kFloat).contiguous();
}

template <typename T>
const acc_of<T>* weights_ptr(const at::Tensor& w) {
  return w.defined() ? w.data_ptr<acc_of<T>>() : nullptr;
}

}  // namespace

at::Tensor gather_merge_cpu(const at::Tensor& tokens_in, const at::Tensor& idx,
                            const std::optional<at::Tensor>& counts, int64_t merge,
                            const std::optional<at::Tensor>& weights) {
  check_gather_merge_inputs(tokens_in, idx, counts, merge, weights);
  const int64_t B = tokens_in.size(0), N = tokens_in.size(1), D = tokens_in.size(2);
  const int64_t K = idx.size(1);
  auto out = new_output({B, K + (merge != kMergeNone), D}, tokens_in.options());
  Plan p = plan_from_idx(idx, counts, N, /*with_repeats=*/false);
  if (out.numel() == 0) return out;
  const at::Tensor tokens = unit_inner_stride(tokens_in);
  const at::Tensor ic = idx.contiguous();
  const at::Tensor wf = opmath_weights(weights, merge, tokens_in.scalar_type());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, tokens.scalar_type(), "gather_merge_cpu", [&] {
    gather_merge_rows<scalar_t>(p, ic.data_ptr<int64_t>(), tokens.data_ptr<scalar_t>(),
                                tokens.stride(0), tokens.stride(1),
                                weights_ptr<scalar_t>(wf), D, merge,
                                out.data_ptr<scalar_t>());
  });
  return out;
}

at::Tensor gather_merge_backward_cpu(const at::Tensor& grad_in, const at::Tensor& idx,
                                     const std::optional<at::Tensor>& counts, int64_t merge,
                                     const std::optional<at::Tensor>& weights, int64_t n_tokens) {
  check_gather_merge_backward_inputs(grad_in, idx, counts, merge, weights, n_tokens);
  const int64_t B = grad_in.size(0), D = grad_in.size(2);
  auto gx = new_output({B, n_tokens, D}, grad_in.options());
  Plan p = plan_from_idx(idx, counts, n_tokens, /*with_repeats=*/true);
  if (gx.numel() == 0) return gx;
  const at::Tensor g = unit_inner_stride(grad_in);
  const at::Tensor wf = opmath_weights(weights, merge, grad_in.scalar_type());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), "gather_merge_backward_cpu", [&] {
    gather_merge_backward_rows<scalar_t>(p, g.data_ptr<scalar_t>(), g.stride(0), g.stride(1),
                                         weights_ptr<scalar_t>(wf), D, merge,
                                         gx.data_ptr<scalar_t>());
  });
  return gx;
}

std::tuple<at::Tensor, at::Tensor> compress_topk_cpu(const at::Tensor& tokens_in,
                                                     const at::Tensor& scores_in, int64_t k,
                                                     int64_t merge,
                                                     const std::optional<at::Tensor>& weights) {
  check_compress_inputs(tokens_in, scores_in, k, merge, weights);
  const int64_t B = tokens_in.size(0), N = tokens_in.size(1), D = tokens_in.size(2);
  auto out = new_output({B, k + (merge != kMergeNone), D}, tokens_in.options());
  auto idx = new_output({B, k}, tokens_in.options().dtype(at::kLong));
  if (B == 0) return {out, idx};

  // Phase 1: per-image selection, written straight into idx, plus the row plan.
  const at::Tensor scores = scores_as_float(scores_in);
  const float* s = scores.data_ptr<float>();
  const int64_t ssb = scores.stride(0), ssn = scores.stride(1);
  int64_t* ip = idx.data_ptr<int64_t>();
  Plan p{B, N, k, std::vector<int64_t>(B, k), std::vector<int64_t>(B * N, -1),
         std::vector<int64_t>(B, N - k), {}};
  at::parallel_for(0, B, rows_grain(N), [&](int64_t b0, int64_t b1) {
    std::vector<uint32_t> keys(N), scratch(N);
    for (int64_t b = b0; b < b1; ++b) {
      cpu::row_keys(s + b * ssb, ssn, N, keys.data());
      cpu::select_top_keys(keys.data(), N, k, scratch.data(), ip + b * k);
      int64_t* fs = p.first_slot.data() + b * N;
      for (int64_t j = 0; j < k; ++j) fs[ip[b * k + j]] = j;
    }
  });
  if (out.numel() == 0) return {out, idx};

  // Phase 2: gather + merge.
  const at::Tensor tokens = unit_inner_stride(tokens_in);
  const at::Tensor wf = opmath_weights(weights, merge, tokens_in.scalar_type());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, tokens.scalar_type(), "compress_topk_cpu", [&] {
    gather_merge_rows<scalar_t>(p, ip, tokens.data_ptr<scalar_t>(), tokens.stride(0),
                                tokens.stride(1), weights_ptr<scalar_t>(wf),
                                D, merge, out.data_ptr<scalar_t>());
  });
  return {out, idx};
}

}  // namespace epic
