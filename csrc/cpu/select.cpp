// CPU kernels of the selection family: top-k in spatial order and IQR outlier selection.
// One OpenMP task per row; every row works on its own O(N) scratch (nth_element, no sort).
#include <ATen/Parallel.h>

#include "cpu_kernels.h"
#include "epic/checks.h"
#include "epic/ops.h"

namespace epic {

namespace {

// Float copy of the scores so the row loops need no dtype dispatch.
at::Tensor scores_as_float(const at::Tensor& scores) {
  return scores.scalar_type() == at::kFloat ? scores : scores.to(at::kFloat);
}

}  // namespace

at::Tensor select_topk_cpu(const at::Tensor& scores_in, int64_t k) {
  check_scores(scores_in);
  const int64_t B = scores_in.size(0), N = scores_in.size(1);
  check_k(k, N);
  auto idx = new_output({B, k}, scores_in.options().dtype(at::kLong));
  if (B == 0 || k == 0) return idx;
  const at::Tensor scores = scores_as_float(scores_in);
  const float* s = scores.data_ptr<float>();
  const int64_t sb = scores.stride(0), sn = scores.stride(1);
  int64_t* out = idx.data_ptr<int64_t>();
  at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
    std::vector<uint32_t> keys(N), scratch(N);
    for (int64_t b = b0; b < b1; ++b) {
      cpu::row_keys(s + b * sb, sn, N, keys.data());
      cpu::select_top_keys(keys.data(), N, k, scratch.data(), out + b * k);
    }
  });
  return idx;
}

std::tuple<at::Tensor, at::Tensor> iqr_select_cpu(const at::Tensor& scores_in, double whisker,
                                                  bool pooled, int64_t max_k) {
  check_scores(scores_in);
  const int64_t B = scores_in.size(0), N = scores_in.size(1);
  auto counts = new_output({B}, scores_in.options().dtype(at::kLong));
  auto indices = new_output({B, N}, scores_in.options().dtype(at::kLong));
  if (B == 0) return {counts, indices};
  const at::Tensor scores = scores_as_float(scores_in);
  const float* s = scores.data_ptr<float>();
  const int64_t sb = scores.stride(0), sn = scores.stride(1);
  const float w = static_cast<float>(whisker);
  int64_t* cnt = counts.data_ptr<int64_t>();
  int64_t* ind = indices.data_ptr<int64_t>();
  const int64_t cap = max_k >= 0 ? max_k : N;

  int64_t pooled_keep = 0;
  if (pooled) {
    // Quantiles over all B*N non-NaN scores, then floor(outliers / B) for every row.
    std::vector<float> v;
    v.reserve(B * N);
    for (int64_t b = 0; b < B; ++b)
      for (int64_t i = 0; i < N; ++i) {
        const float x = s[b * sb + i * sn];
        if (x == x) v.push_back(x);
      }
    const float fence = cpu::upper_fence(v.data(), static_cast<int64_t>(v.size()), w);
    int64_t outliers = 0;
    for (int64_t b = 0; b < B; ++b)
      for (int64_t i = 0; i < N; ++i) outliers += s[b * sb + i * sn] > fence;
    pooled_keep = outliers / B;
  }

  at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
    std::vector<uint32_t> keys(N), scratch(N);
    std::vector<float> v(N);
    for (int64_t b = b0; b < b1; ++b) {
      const float* row = s + b * sb;
      int64_t c;
      if (pooled) {
        c = pooled_keep;
      } else {
        int64_t n = 0;
        for (int64_t i = 0; i < N; ++i) {
          const float x = row[i * sn];
          if (x == x) v[n++] = x;
        }
        const float fence = cpu::upper_fence(v.data(), n, w);
        c = 0;
        for (int64_t i = 0; i < N; ++i) c += row[i * sn] > fence;
      }
      c = std::min(c, cap);
      cnt[b] = c;
      int64_t* out = ind + b * N;
      cpu::row_keys(row, sn, N, keys.data());
      cpu::select_top_keys(keys.data(), N, c, scratch.data(), out);
      std::fill(out + c, out + N, int64_t(-1));
    }
  });
  return {counts, indices};
}

}  // namespace epic
