// Host entry points of every epic_ext kernel. Each op has a *_cpu definition in csrc/cpu and,
// when the build includes CUDA, a *_cuda definition in csrc/cuda with the same contract.
//
// Contracts (shape checks are done here in C++ too, so a direct _C call cannot crash):
//   select_topk(scores[B,N] float, k)              -> idx[B,k] int64, ascending, ties to the lower
//                                                      index, NaN ranks below every number.
//   iqr_select(scores[B,N], whisker, pooled, max_k) -> (counts[B] int64, indices[B,N] int64): row b
//       keeps its top counts[b] scores (spatial order), indices padded with -1. counts[b] is the
//       number of scores > Q3 + whisker (Q3 - Q1) (quantiles of the row, or of all rows pooled,
//       NaN excluded, torch.quantile "linear"); pooled: floor(total outliers / B) for every row.
//       max_k >= 0 caps every count.
//   gather_merge(tokens[B,N,D], idx[B,K], counts[B]?, merge, weights[B,N]?)
//       -> out[B, K + (merge != none), D]: rows j < counts[b] (all K if counts is absent) copy
//       tokens[b, idx[b,j]]; the next row is the merge of the rows not referenced by a valid idx
//       (mean, or sum of weights[b,n] * x); the rest is zero. A valid idx entry outside [0, N) or
//       counts[b] outside [0, K]: the CPU entry raises ValueError; the CUDA entry (no host read)
//       writes NaN to every output row of image b. N = 0 with counts 0: the merged row is zero.
//   gather_merge_backward(grad_out, idx, counts?, merge, weights?, N) -> grad_tokens[B,N,D]: a
//       repeated row gets the sum of its slots' gradients, accumulated in acc_of<T> and rounded
//       once; bad indices as in the forward (CUDA: every gradient row of image b is NaN).
//   compress_topk(tokens, scores, k, merge, weights?) -> (out, idx): select_topk + gather_merge in
//       one kernel.
//   kl_div(student[T,V], teacher[T,V], row_mask[T]?, temperature, reduction, reverse, compute_grad,
//          inplace) -> (loss, grad): loss is [T] fp32 (reduction none) or a 0-d fp32 tensor;
//       tau^2 KL(p_t || p_s) (reverse: KL(p_s || p_t)) with p = softmax(logits / tau); grad is
//       d loss / d student already divided by the normaliser (rows for batchmean, rows * V for
//       mean), zero for masked-out rows, in the logits' dtype (written over student if inplace),
//       or an empty tensor when compute_grad is false. A kept row whose softmax is undefined on
//       either side (a NaN or +inf logit / tau, or every logit -inf) has loss NaN (so has a
//       reduced loss) and an all-NaN gradient row; -inf logits elsewhere are legal. tau, 1 / tau
//       and tau^2 must be normal fp32 numbers.
//   attn_scores(q[B,H,Q,d], k[B,Hkv,L,d], lse[B,H,Q] fp32?, key_start[B] int64?, key_start_int,
//               key_len, kv_start[B] int64?, kv_start_int, q_pos[B,Q] int64?, scale, causal,
//               reduction) -> out[B, key_len] fp32: softmax probabilities of the query rows over
//       the keys they see, at keys j = start_b + t (start_b = key_start[b], or key_start_int
//       without the tensor), summed (reduction 1) or averaged (2) over the H*Q rows. Head h reads
//       kv head h / (H / Hkv). Scores s = scale <q, k> in fp32. Key j is visible to row (b, i) when
//       j >= kv_start[b] (or kv_start_int) and, if causal, j <= q_pos[b, i] (absent: L - Q + i);
//       invisible keys contribute 0, so does a row without visible keys. p = exp(s - lse) with the
//       given row log-sum-exp, else that of the row's visible scores (online, K read once). Span
//       entries outside [0, L) are NaN. Index tensors are not range-checked (the Python layer does
//       that on request): any value is memory-safe. q may have any strides, k any strides with
//       the last dimension copied to unit stride when it is not.
#pragma once

#include <ATen/ATen.h>
#include <optional>
#include <tuple>

namespace epic {

at::Tensor select_topk_cpu(const at::Tensor& scores, int64_t k);
std::tuple<at::Tensor, at::Tensor> iqr_select_cpu(const at::Tensor& scores, double whisker,
                                                  bool pooled, int64_t max_k);
at::Tensor gather_merge_cpu(const at::Tensor& tokens, const at::Tensor& idx,
                            const std::optional<at::Tensor>& counts, int64_t merge,
                            const std::optional<at::Tensor>& weights);
at::Tensor gather_merge_backward_cpu(const at::Tensor& grad_out, const at::Tensor& idx,
                                     const std::optional<at::Tensor>& counts, int64_t merge,
                                     const std::optional<at::Tensor>& weights, int64_t n_tokens);
std::tuple<at::Tensor, at::Tensor> compress_topk_cpu(const at::Tensor& tokens,
                                                     const at::Tensor& scores, int64_t k,
                                                     int64_t merge,
                                                     const std::optional<at::Tensor>& weights);

std::tuple<at::Tensor, at::Tensor> kl_div_cpu(const at::Tensor& student, const at::Tensor& teacher,
                                              const std::optional<at::Tensor>& row_mask,
                                              double temperature, int64_t reduction, bool reverse,
                                              bool compute_grad, bool inplace);

at::Tensor attn_scores_cpu(const at::Tensor& q, const at::Tensor& k,
                           const std::optional<at::Tensor>& lse,
                           const std::optional<at::Tensor>& key_start, int64_t key_start_int,
                           int64_t key_len, const std::optional<at::Tensor>& kv_start,
                           int64_t kv_start_int, const std::optional<at::Tensor>& q_pos,
                           double scale, bool causal, int64_t reduction);

#ifdef EPIC_WITH_CUDA
at::Tensor select_topk_cuda(const at::Tensor& scores, int64_t k);
std::tuple<at::Tensor, at::Tensor> iqr_select_cuda(const at::Tensor& scores, double whisker,
                                                   bool pooled, int64_t max_k);
at::Tensor gather_merge_cuda(const at::Tensor& tokens, const at::Tensor& idx,
                             const std::optional<at::Tensor>& counts, int64_t merge,
                             const std::optional<at::Tensor>& weights);
at::Tensor gather_merge_backward_cuda(const at::Tensor& grad_out, const at::Tensor& idx,
                                      const std::optional<at::Tensor>& counts, int64_t merge,
                                      const std::optional<at::Tensor>& weights, int64_t n_tokens);
std::tuple<at::Tensor, at::Tensor> compress_topk_cuda(const at::Tensor& tokens,
                                                      const at::Tensor& scores, int64_t k,
                                                      int64_t merge,
                                                      const std::optional<at::Tensor>& weights);
std::tuple<at::Tensor, at::Tensor> kl_div_cuda(const at::Tensor& student, const at::Tensor& teacher,
                                               const std::optional<at::Tensor>& row_mask,
                                               double temperature, int64_t reduction, bool reverse,
                                               bool compute_grad, bool inplace);
at::Tensor attn_scores_cuda(const at::Tensor& q, const at::Tensor& k,
                            const std::optional<at::Tensor>& lse,
                            const std::optional<at::Tensor>& key_start, int64_t key_start_int,
                            int64_t key_len, const std::optional<at::Tensor>& kv_start,
                            int64_t kv_start_int, const std::optional<at::Tensor>& q_pos,
                            double scale, bool causal, int64_t reduction);
#endif

}  // namespace epic
