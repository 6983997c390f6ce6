// Argument checks and input preparation shared by the CPU and CUDA host entries. The checks raise
// c10::ValueError / c10::TypeError, which Python sees as ValueError / TypeError, always naming the
// argument.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>
#include <atomic>
#include <cmath>
#include <limits>
#include <optional>

#ifdef __linux__
#include <sys/mman.h>
#endif

#include "epic/common.h"

namespace epic {

// Test hook: when set (epic_ext._C.set_poison(True)), every fresh output is filled with NaN
// (floats) or INT64_MIN / true (ints / bools) so tests prove that kernels write every element.
inline std::atomic<bool> g_poison_outputs{false};

// Fresh CPU outputs of several MiB are page-faulted 4 KiB at a time on first write, which costs
// as much as a bandwidth-bound kernel itself; ask for transparent huge pages while untouched.
inline void advise_huge_pages(const at::Tensor& t) {
#ifdef __linux__
  if (!t.device().is_cpu()) return;
  const size_t bytes = t.numel() * t.element_size();
  if (bytes < (size_t(8) << 20)) return;
  const uintptr_t huge = uintptr_t(2) << 20;
  const uintptr_t start = reinterpret_cast<uintptr_t>(t.data_ptr());
  const uintptr_t begin = (start + huge - 1) & ~(huge - 1);
  const uintptr_t end = (start + bytes) & ~(huge - 1);
  if (end > begin) madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
#else
  (void)t;
#endif
}

inline at::Tensor new_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
  at::Tensor t = at::empty(sizes, options);
  advise_huge_pages(t);
  if (g_poison_outputs.load(std::memory_order_relaxed) && t.numel() > 0) {
    if (at::isFloatingType(t.scalar_type()))
      t.fill_(std::numeric_limits<double>::quiet_NaN());
    else if (t.scalar_type() == at::kBool)
      t.fill_(true);
    else
      t.fill_(std::numeric_limits<int64_t>::min());
  }
  return t;
}

// Inputs whose last stride is not 1 are copied once; any other strides are used as they are.
inline at::Tensor unit_inner_stride(const at::Tensor& t) {
  return t.size(-1) <= 1 || t.stride(-1) == 1 ? t : t.contiguous();
}

// Optional inputs (index tensors, lse) in the contiguous layout the kernels index.
inline std::optional<at::Tensor> contiguous_opt(const std::optional<at::Tensor>& t) {
  return t.has_value() ? std::optional<at::Tensor>(t->contiguous()) : std::nullopt;
}

// Scores as fp32, the type every selection kernel ranks (no copy when they already are).
inline at::Tensor scores_as_float(const at::Tensor& scores) {
  return scores.scalar_type() == at::kFloat ? scores : scores.to(at::kFloat);
}

// The cuda backend's entries take CUDA tensors only.
inline void check_cuda_tensor(const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.is_cuda(), name, " must be a CUDA tensor for the cuda backend, got ",
                    t.device());
}

inline bool is_float_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16 || t == at::kDouble;
}

inline void check_scores(const at::Tensor& scores, const char* name = "scores") {
  TORCH_CHECK_VALUE(scores.dim() == 2, name, " must be 2-D [B, N], got shape ", scores.sizes());
  TORCH_CHECK_TYPE(is_float_dtype(scores.scalar_type()), name,
                   " must be a floating tensor (float32/float16/bfloat16/float64), got ",
                   scores.scalar_type());
}

inline void check_tokens(const at::Tensor& tokens) {
  TORCH_CHECK_VALUE(tokens.dim() == 3, "tokens must be 3-D [B, N, D], got shape ", tokens.sizes());
  TORCH_CHECK_TYPE(is_float_dtype(tokens.scalar_type()),
                   "tokens must be a floating tensor (float32/float16/bfloat16/float64), got ",
                   tokens.scalar_type());
}

inline void check_merge(int64_t merge, const std::optional<at::Tensor>& weights, int64_t B,
                        int64_t N, const at::Device& device) {
  TORCH_CHECK_VALUE(merge == kMergeNone || merge == kMergeMean || merge == kMergeWeighted,
                    "merge must be 0 (none), 1 (mean) or 2 (weighted), got ", merge);
  if (merge == kMergeWeighted) {
    TORCH_CHECK_VALUE(weights.has_value(), "weights are required when merge is weighted");
    const auto& w = *weights;
    TORCH_CHECK_VALUE(w.dim() == 2 && w.size(0) == B && w.size(1) == N, "weights must be [B, N] = [",
                      B, ", ", N, "], got ", w.sizes());
    TORCH_CHECK_TYPE(is_float_dtype(w.scalar_type()), "weights must be floating, got ",
                     w.scalar_type());
    TORCH_CHECK_VALUE(w.device() == device, "weights must be on ", device, ", got ", w.device());
  }
}

inline void check_merge(int64_t merge, const std::optional<at::Tensor>& weights,
                        const at::Tensor& tokens) {
  check_merge(merge, weights, tokens.size(0), tokens.size(1), tokens.device());
}

inline void check_idx(const at::Tensor& idx, const at::Tensor& tokens,
                      const std::optional<at::Tensor>& counts) {
  TORCH_CHECK_VALUE(idx.dim() == 2 && idx.size(0) == tokens.size(0),
                    "idx must be [B, K] with B = ", tokens.size(0), ", got ", idx.sizes());
  TORCH_CHECK_TYPE(idx.scalar_type() == at::kLong, "idx must be int64, got ", idx.scalar_type());
  TORCH_CHECK_VALUE(idx.device() == tokens.device(), "idx must be on ", tokens.device(), ", got ",
                    idx.device());
  if (counts.has_value()) {
    const auto& c = *counts;
    TORCH_CHECK_VALUE(c.dim() == 1 && c.size(0) == tokens.size(0), "counts must be [B] with B = ",
                      tokens.size(0), ", got ", c.sizes());
    TORCH_CHECK_TYPE(c.scalar_type() == at::kLong, "counts must be int64, got ", c.scalar_type());
    TORCH_CHECK_VALUE(c.device() == tokens.device(), "counts must be on ", tokens.device(),
                      ", got ", c.device());
  }
}

inline void check_k(int64_t k, int64_t n) {
  TORCH_CHECK_VALUE(k >= 0 && k <= n, "k must be in [0, N] = [0, ", n, "], got ", k);
}

// The gather_merge, gather_merge_backward and compress_topk contracts (ops.h).
inline void check_gather_merge_inputs(const at::Tensor& tokens, const at::Tensor& idx,
                                      const std::optional<at::Tensor>& counts, int64_t merge,
                                      const std::optional<at::Tensor>& weights) {
  check_tokens(tokens);
  check_idx(idx, tokens, counts);
  check_merge(merge, weights, tokens);
}

inline void check_gather_merge_backward_inputs(const at::Tensor& grad_out, const at::Tensor& idx,
                                               const std::optional<at::Tensor>& counts,
                                               int64_t merge,
                                               const std::optional<at::Tensor>& weights,
                                               int64_t n_tokens) {
  TORCH_CHECK_VALUE(grad_out.dim() == 3, "grad_out must be 3-D, got ", grad_out.sizes());
  TORCH_CHECK_VALUE(n_tokens >= 0, "n_tokens must be >= 0, got ", n_tokens);
  const int64_t rows = idx.size(1) + (merge != kMergeNone);
  TORCH_CHECK_VALUE(grad_out.size(1) == rows, "grad_out has ", grad_out.size(1),
                    " rows, expected ", rows);
  check_idx(idx, grad_out, counts);
  check_merge(merge, weights, grad_out.size(0), n_tokens, grad_out.device());
}

inline void check_compress_inputs(const at::Tensor& tokens, const at::Tensor& scores, int64_t k,
                                  int64_t merge, const std::optional<at::Tensor>& weights) {
  check_tokens(tokens);
  check_scores(scores);
  const int64_t B = tokens.size(0), N = tokens.size(1);
  TORCH_CHECK_VALUE(scores.size(0) == B && scores.size(1) == N, "scores must be [B, N] = [", B,
                    ", ", N, "], got ", scores.sizes());
  TORCH_CHECK_VALUE(scores.device() == tokens.device(), "scores must be on ", tokens.device(),
                    ", got ", scores.device());
  check_k(k, N);
  check_merge(merge, weights, tokens);
}

inline void check_kl_inputs(const at::Tensor& student, const at::Tensor& teacher,
                            const std::optional<at::Tensor>& row_mask, double temperature,
                            int64_t reduction, bool inplace) {
  TORCH_CHECK_VALUE(student.dim() == 2, "student logits must be 2-D [T, V], got ", student.sizes());
  TORCH_CHECK_VALUE(teacher.sizes() == student.sizes(), "teacher logits must match student ",
                    student.sizes(), ", got ", teacher.sizes());
  TORCH_CHECK_TYPE(is_float_dtype(student.scalar_type()), "student logits must be floating, got ",
                   student.scalar_type());
  TORCH_CHECK_TYPE(teacher.scalar_type() == student.scalar_type(),
                   "teacher logits must have the student's dtype ", student.scalar_type(), ", got ",
                   teacher.scalar_type());
  TORCH_CHECK_VALUE(teacher.device() == student.device(), "teacher logits must be on ",
                    student.device(), ", got ", teacher.device());
  // The kernels use tau, 1 / tau and tau^2 in fp32: all three must be normal fp32 numbers.
  const double tau2 = temperature * temperature;
  TORCH_CHECK_VALUE(temperature > 0 && std::isfinite(temperature) &&
                        tau2 >= static_cast<double>(std::numeric_limits<float>::min()) &&
                        tau2 <= static_cast<double>(std::numeric_limits<float>::max()),
                    "temperature must be finite and > 0 with tau, 1/tau and tau^2 normal fp32 "
                    "numbers (about 1.1e-19 <= tau <= 1.8e19), got ", temperature);
  TORCH_CHECK_VALUE(reduction >= kReduceNone && reduction <= kReduceBatchMean,
                    "reduction code must be 0..3, got ", reduction);
  TORCH_CHECK_VALUE(!inplace || (student.stride(1) == 1 || student.size(1) <= 1),
                    "inplace needs student logits with a unit last stride");
  if (row_mask.has_value()) {
    TORCH_CHECK_VALUE(row_mask->dim() == 1 && row_mask->size(0) == student.size(0),
                      "mask must be [T] = [", student.size(0), "], got ", row_mask->sizes());
    TORCH_CHECK_TYPE(row_mask->scalar_type() == at::kBool, "mask must be bool, got ",
                     row_mask->scalar_type());
    TORCH_CHECK_VALUE(row_mask->device() == student.device(), "mask must be on ",
                      student.device(), ", got ", row_mask->device());
  }
}

// The attn_scores contract (ops.h). Index tensors are checked for dtype, shape and device only:
// their values are the Python layer's business (a range check costs a host sync on a GPU).
inline void check_attn_index(const std::optional<at::Tensor>& t, const char* name, int64_t B,
                             int64_t Q, bool per_row, const at::Device& device) {
  if (!t.has_value()) return;
  TORCH_CHECK_TYPE(t->scalar_type() == at::kLong, name, " must be int64, got ", t->scalar_type());
  if (per_row) {
    TORCH_CHECK_VALUE(t->dim() == 2 && t->size(0) == B && t->size(1) == Q, name,
                      " must be [B, Q] = [", B, ", ", Q, "], got ", t->sizes());
  } else {
    TORCH_CHECK_VALUE(t->dim() == 1 && t->size(0) == B, name, " must be [B] = [", B, "], got ",
                      t->sizes());
  }
  TORCH_CHECK_VALUE(t->device() == device, name, " must be on ", device, ", got ", t->device());
}

inline void check_attn_inputs(const at::Tensor& q, const at::Tensor& k,
                              const std::optional<at::Tensor>& lse,
                              const std::optional<at::Tensor>& key_start, int64_t key_start_int,
                              int64_t key_len, const std::optional<at::Tensor>& kv_start,
                              const std::optional<at::Tensor>& q_pos, double scale,
                              int64_t reduction) {
  TORCH_CHECK_VALUE(q.dim() == 4, "q must be 4-D [B, H, Q, d], got shape ", q.sizes());
  TORCH_CHECK_VALUE(k.dim() == 4, "k must be 4-D [B, Hkv, L, d], got shape ", k.sizes());
  const auto dt = q.scalar_type();
  TORCH_CHECK_TYPE(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16,
                   "q must be float32/float16/bfloat16, got ", dt);
  TORCH_CHECK_TYPE(k.scalar_type() == dt, "k must have q's dtype ", dt, ", got ", k.scalar_type());
  TORCH_CHECK_VALUE(k.device() == q.device(), "k must be on ", q.device(), ", got ", k.device());
  const int64_t B = q.size(0), H = q.size(1), Q = q.size(2), d = q.size(3);
  const int64_t Hkv = k.size(1), L = k.size(2);
  TORCH_CHECK_VALUE(H >= 1 && Q >= 1 && d >= 1, "q must have H, Q, d >= 1, got ", q.sizes());
  TORCH_CHECK_VALUE(k.size(0) == B && k.size(3) == d, "k must be [B, Hkv, L, d] with B = ", B,
                    " and d = ", d, ", got ", k.sizes());
  TORCH_CHECK_VALUE(Hkv >= 1 && H % Hkv == 0, "k's head count Hkv = ", Hkv,
                    " must divide q's H = ", H);
  TORCH_CHECK_VALUE(key_len >= 1 && key_len <= L, "key_len must be in [1, L] = [1, ", L,
                    "], got ", key_len);
  if (!key_start.has_value()) {
    TORCH_CHECK_VALUE(key_start_int >= 0 && key_start_int <= L - key_len,
                      "key_start must be in [0, L - key_len] = [0, ", L - key_len, "], got ",
                      key_start_int);
  }
  TORCH_CHECK_VALUE(std::isfinite(scale), "scale must be finite, got ", scale);
  TORCH_CHECK_VALUE(reduction == kReduceSum || reduction == kReduceMean,
                    "reduction code must be 1 (sum) or 2 (mean), got ", reduction);
  if (lse.has_value()) {
    TORCH_CHECK_TYPE(lse->scalar_type() == at::kFloat, "lse must be float32, got ",
                     lse->scalar_type());
    TORCH_CHECK_VALUE(lse->dim() == 3 && lse->size(0) == B && lse->size(1) == H &&
                          lse->size(2) == Q,
                      "lse must be [B, H, Q] = [", B, ", ", H, ", ", Q, "], got ", lse->sizes());
    TORCH_CHECK_VALUE(lse->device() == q.device(), "lse must be on ", q.device(), ", got ",
                      lse->device());
  }
  check_attn_index(key_start, "key_start", B, Q, false, q.device());
  check_attn_index(kv_start, "kv_start", B, Q, false, q.device());
  check_attn_index(q_pos, "q_pos", B, Q, true, q.device());
}

}  // namespace epic
