// CPU kernels of the selection family: top-k in spatial order and IQR outlier selection.
//
// Each row's order statistics come from the counting-pass search of order_stats.h, straight on
// the float scores (no sort, no key array); the kept indices are then written by one
// compaction scan:
//   per image: Q1 and Q3 (with their upper neighbours) in shared passes; the kept set is exactly
//              {x > fence} unless max_k caps it (then a top-max_k selection);
//   pooled:    the same quantile search over all B*N scores at once, per-row counts above the
//              fence, keep = floor(total / B) (capped), and per row a top-keep selection that
//              starts from the fence, which already splits the row near the answer.
// Small calls run on the calling thread (see kSerialWork); the kernels are compiled twice,
// baseline and AVX2, and picked at run time (see cpu_kernels.h).
#include <ATen/Parallel.h>

#include <cstdlib>
#include <memory>
#include <vector>

#include "cpu_kernels.h"
#include "epic/checks.h"
#include "epic/ops.h"
#include "order_stats.h"

namespace epic {

namespace {

using cpu::RankQuery;

// Below this many scores a call runs on the calling thread: with OpenMP, at::parallel_for's
// fork/join costs microseconds when the other cores idle and up to a scheduler slice (~10 ms,
// measured) when another process keeps them busy, for ~1 ns of work per score.
constexpr int64_t kSerialWork = int64_t(1) << 18;
constexpr int kMaxSample = 256;

bool use_avx2() {
#if EPIC_CPU_AVX2
  // EPIC_EXT_NO_AVX2=1 forces the baseline build (to test it on an AVX2 machine).
  static const bool on = (__builtin_cpu_init(), __builtin_cpu_supports("avx2")) &&
                         __builtin_cpu_supports("popcnt") && std::getenv("EPIC_EXT_NO_AVX2") == nullptr;
  return on;
#else
  return false;
#endif
}

// Run kernel.run<kAvx2>(b0, b1) with the best instruction set. `flatten` inlines every helper
// into the two instances, so the AVX2 one vectorises all of them for AVX2.
template <class Kernel>
__attribute__((flatten)) void run_base(const Kernel& kernel, int64_t b0, int64_t b1) {
  kernel.template run<false>(b0, b1);
}
#if EPIC_CPU_AVX2
template <class Kernel>
EPIC_AVX2_FN __attribute__((flatten)) void run_avx2(const Kernel& kernel, int64_t b0, int64_t b1) {
  kernel.template run<true>(b0, b1);
}
#endif
template <class Kernel>
void run_dispatch(const Kernel& kernel, int64_t b0, int64_t b1) {
#if EPIC_CPU_AVX2
  if (use_avx2()) return run_avx2(kernel, b0, b1);
#endif
  run_base(kernel, b0, b1);
}

// Rows [0, B) of N scores each, in one task when the call is small, else over the thread pool.
template <class Kernel>
void run_rows(const Kernel& kernel, int64_t B, int64_t N) {
  if (B * N <= kSerialWork) return run_dispatch(kernel, 0, B);
  const int64_t grain = std::max<int64_t>(1, kSerialWork / 4 / std::max<int64_t>(N, 1));
  at::parallel_for(0, B, grain, [&](int64_t b0, int64_t b1) { run_dispatch(kernel, b0, b1); });
}

// Search scratch for up to n scores: the sample and the four bracket buffers of two queries.
struct Scratch {
  std::vector<float> mem;
  int32_t sample[kMaxSample];
  float* buf[4];
  explicit Scratch(int64_t n) : mem(4 * (n + 8)) {
    for (int t = 0; t < 4; ++t) buf[t] = mem.data() + t * (n + 8);
  }
  int64_t room() const { return static_cast<int64_t>(mem.size()) / 4 - 8; }
};

// Per-thread scratch reused across calls (page faults on fresh buffers cost as much as a row);
// beyond kKeptScratch scores a call gets its own, so no thread keeps a huge buffer.
constexpr int64_t kKeptScratch = int64_t(1) << 20;
Scratch& thread_scratch(int64_t n, std::unique_ptr<Scratch>& own) {
  thread_local std::unique_ptr<Scratch> s;
  std::unique_ptr<Scratch>& use = n <= kKeptScratch ? s : own;
  if (!use || use->room() < n) use = std::make_unique<Scratch>(n);
  return *use;
}

// The upper IQR fence of x[0..n) (`nan` of them NaN); false when it is NaN (no number, or
// inf - inf), in which case nothing is an outlier.
template <bool kAvx2>
bool upper_fence(const float* x, int64_t n, int64_t nan, float whisker, Scratch& s, float* fence) {
  const int64_t nv = n - nan;
  if (nv == 0) return false;
  const float qs[2] = {0.25f, 0.75f};
  RankQuery q[2];
  float w[2];
  for (int t = 0; t < 2; ++t) {
    int64_t below;
    quantile_rank(qs[t], nv, &below, &w[t]);
    // Rank `below` among the numbers is rank nan + below among all scores (NaN ranks lowest);
    // torch.quantile reads the next order statistic only when the weight is > 0.
    q[t] = RankQuery::make(nan + below, nan + below + (w[t] > 0.0f), n, nan);
  }
  cpu::select_ranks<kAvx2>(x, n, q, 2, s.sample, cpu::sample_size(n), s.buf);
  float quart[2];
  for (int t = 0; t < 2; ++t) {
    const float lo = cpu::key_score(q[t].v);
    const float hi = w[t] > 0.0f ? cpu::key_score(q[t].v2) : lo;
    quart[t] = quantile_lerp(lo, hi, w[t]);
  }
  *fence = iqr_fence(quart[0], quart[1], whisker);
  return *fence == *fence;
}

// Row output: the indices (ascending) of the `keep` best scores, padded with -1. When has_fence,
// above = #{x > fence} and `written` says whether out already holds exactly those indices.
// ("x > fence" is "x >= at_least(key(fence))", the form the compactions use.)
template <bool kAvx2>
void emit_row(const float* x, int64_t N, int64_t nan, int64_t keep, bool has_fence, float fence,
              int64_t above, bool written, Scratch& s, int64_t* out) {
  if (keep >= N) {
    for (int64_t i = 0; i < N; ++i) out[i] = i;
    return;
  }
  if (keep > 0 && has_fence && keep == above) {
    if (!written) cpu::emit_at_least<kAvx2>(x, N, cpu::at_least(cpu::score_key(fence)), out, N);
  } else if (keep > 0) {
    RankQuery q = RankQuery::make(N - keep, N - keep, N, nan);
    if (has_fence) {  // the fence splits the row: start from the side that holds rank N - keep
      const int32_t fk = cpu::score_key(fence);
      if (above > keep) q.lo = fk, q.dlo = N - above, q.lo_set = true;
      else q.hi = fk, q.dhi = N - above, q.hi_set = true;
    }
    cpu::select_ranks<kAvx2>(x, N, &q, 1, s.sample, cpu::sample_size(N), s.buf);
    cpu::emit_top<kAvx2>(x, N, keep, q.v, out);
  }
  std::fill(out + keep, out + N, int64_t(-1));
}

struct IqrArgs {
  const float* s;
  int64_t sb, B, N;  // rows are contiguous: x = s + b * sb
  float whisker;
  int64_t cap;
  int64_t *cnt, *ind;
};

// Per-image IQR: one fence per row.
struct PerImageRows {
  const IqrArgs& a;
  template <bool kAvx2>
  void run(int64_t b0, int64_t b1) const {
    std::unique_ptr<Scratch> own;
    Scratch& s = thread_scratch(a.N, own);
    for (int64_t b = b0; b < b1; ++b) {
      const float* x = a.s + b * a.sb;
      int64_t* out = a.ind + b * a.N;
      const int64_t nan = cpu::count_nan(x, a.N);
      float fence = 0.0f;
      const bool has_fence = upper_fence<kAvx2>(x, a.N, nan, a.whisker, s, &fence);
      // The usual case keeps every outlier, so write them right away; that also counts them.
      const float above_fence = cpu::at_least(cpu::score_key(fence));  // x >= it <=> x > fence
      const int64_t above = has_fence ? cpu::emit_at_least<kAvx2>(x, a.N, above_fence, out, a.N) : 0;
      a.cnt[b] = std::min(above, a.cap);
      emit_row<kAvx2>(x, a.N, nan, a.cnt[b], has_fence, fence, above, true, s, out);
    }
  }
};

// Pooled IQR, phase 1 (one task): the fence over all B * N scores, and the per-row outliers.
struct PooledFence {
  const IqrArgs& a;
  bool* has_fence;
  float* fence;
  int64_t* nan_rows;
  int64_t* above;
  template <bool kAvx2>
  void run(int64_t, int64_t) const {
    const int64_t n = a.B * a.N;
    int64_t nan = 0;
    for (int64_t b = 0; b < a.B; ++b) nan += nan_rows[b] = cpu::count_nan(a.s + b * a.N, a.N);
    std::unique_ptr<Scratch> own;
    *has_fence = upper_fence<kAvx2>(a.s, n, nan, a.whisker, thread_scratch(n, own), fence);
    const float f = cpu::at_least(cpu::score_key(*fence));  // x >= f  <=>  x > fence
    for (int64_t b = 0; b < a.B; ++b) {
      above[b] = 0;
      if (*has_fence) cpu::count_above<1>(a.s + b * a.N, a.N, &f, above + b);
    }
  }
};

// Pooled IQR, phase 2: every row keeps its `keep` best.
struct PooledRows {
  const IqrArgs& a;
  bool has_fence;
  float fence;
  const int64_t *nan, *above;
  int64_t keep;
  template <bool kAvx2>
  void run(int64_t b0, int64_t b1) const {
    std::unique_ptr<Scratch> own;
    Scratch& s = thread_scratch(a.N, own);
    for (int64_t b = b0; b < b1; ++b) {
      a.cnt[b] = keep;
      emit_row<kAvx2>(a.s + b * a.N, a.N, nan[b], keep, has_fence, fence, above[b], false, s,
                      a.ind + b * a.N);
    }
  }
};

// Top-k rows (select_topk), rows contiguous at x = s + b * sb.
struct TopkRows {
  const float* s;
  int64_t sb, N, k;
  int64_t* out;
  template <bool kAvx2>
  void run(int64_t b0, int64_t b1) const {
    std::unique_ptr<Scratch> own;
    Scratch& sc = thread_scratch(N, own);
    for (int64_t b = b0; b < b1; ++b) {
      const float* x = s + b * sb;
      int64_t* o = out + b * k;
      if (k >= N) {
        for (int64_t i = 0; i < N; ++i) o[i] = i;
        continue;
      }
      RankQuery q = RankQuery::make(N - k, N - k, N, cpu::count_nan(x, N));
      cpu::select_ranks<kAvx2>(x, N, &q, 1, sc.sample, cpu::sample_size(N), sc.buf);
      cpu::emit_top<kAvx2>(x, N, k, q.v, o);
    }
  }
};

// select_top_keys on float_key keys (compress_topk): back to scores (key 0 -> NaN), then as
// TopkRows for one row.
struct TopKeysRow {
  const uint32_t* keys;
  int64_t n, k;
  int64_t* out;
  template <bool kAvx2>
  void run(int64_t, int64_t) const {
    thread_local std::vector<float> x;
    if (static_cast<int64_t>(x.size()) < n) x.resize(n);
    for (int64_t i = 0; i < n; ++i) x[i] = key_float(keys[i]);
    TopkRows{x.data(), 0, n, k, out}.template run<kAvx2>(0, 1);
  }
};

// Float scores with unit stride along N (and fully contiguous when `whole`).
at::Tensor scores_as_float_rows(const at::Tensor& scores, bool whole) {
  const at::Tensor s = scores_as_float(scores);
  return (s.stride(1) == 1 && (!whole || s.is_contiguous())) ? s : s.contiguous();
}

}  // namespace

namespace cpu {

void select_top_keys(const uint32_t* keys, int64_t n, int64_t k, uint32_t* /*scratch*/,
                     int64_t* out) {
  if (k <= 0) return;
  run_dispatch(TopKeysRow{keys, n, k, out}, 0, 1);
}

}  // namespace cpu

at::Tensor select_topk_cpu(const at::Tensor& scores_in, int64_t k) {
  check_scores(scores_in);
  const int64_t B = scores_in.size(0), N = scores_in.size(1);
  check_k(k, N);
  auto idx = new_output({B, k}, scores_in.options().dtype(at::kLong));
  if (B == 0 || k == 0) return idx;
  const at::Tensor scores = scores_as_float_rows(scores_in, false);
  run_rows(TopkRows{scores.data_ptr<float>(), scores.stride(0), N, k, idx.data_ptr<int64_t>()},
           B, N);
  return idx;
}

std::tuple<at::Tensor, at::Tensor> iqr_select_cpu(const at::Tensor& scores_in, double whisker,
                                                  bool pooled, int64_t max_k) {
  check_scores(scores_in);
  const int64_t B = scores_in.size(0), N = scores_in.size(1);
  auto counts = new_output({B}, scores_in.options().dtype(at::kLong));
  auto indices = new_output({B, N}, scores_in.options().dtype(at::kLong));
  if (B == 0) return {counts, indices};
  const at::Tensor scores = scores_as_float_rows(scores_in, pooled);
  const IqrArgs a{scores.data_ptr<float>(), scores.stride(0), B, N, static_cast<float>(whisker),
                  max_k >= 0 ? max_k : N, counts.data_ptr<int64_t>(), indices.data_ptr<int64_t>()};
  if (!pooled) {
    run_rows(PerImageRows{a}, B, N);
    return {counts, indices};
  }
  std::vector<int64_t> nan(B), above(B);
  bool has_fence = false;
  float fence = 0.0f;
  run_dispatch(PooledFence{a, &has_fence, &fence, nan.data(), above.data()}, 0, 1);
  int64_t total = 0;
  for (int64_t b = 0; b < B; ++b) total += above[b];
  run_rows(PooledRows{a, has_fence, fence, nan.data(), above.data(), std::min(total / B, a.cap)},
           B, N);
  return {counts, indices};
}

}  // namespace epic
