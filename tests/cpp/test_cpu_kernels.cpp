// C++ unit tests of the CPU kernels, independent of Python: each kernel against a brute-force
// computation written here with plain loops and std::sort. Run by ctest (see CMakeLists.txt).
#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <functional>
#include <limits>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "epic/checks.h"
#include "epic/ops.h"

namespace {

int g_failures = 0;
int g_checks = 0;

#define EXPECT(cond, ...)                                                   \
  do {                                                                      \
    ++g_checks;                                                             \
    if (!(cond)) {                                                          \
      ++g_failures;                                                         \
      std::fprintf(stderr, "FAIL %s:%d: %s ", __FILE__, __LINE__, #cond);   \
      std::fprintf(stderr, __VA_ARGS__);                                    \
      std::fprintf(stderr, "\n");                                           \
    }                                                                       \
  } while (0)

std::mt19937 rng(1234);

std::vector<float> random_row(int64_t n, bool ties, bool nans) {
  std::normal_distribution<float> normal;
  std::uniform_int_distribution<int> small(0, 3);
  std::uniform_real_distribution<float> unit;
  std::vector<float> v(n);
  for (auto& x : v) {
    x = ties ? float(small(rng)) : std::pow(normal(rng), 3.0f);
    if (nans && unit(rng) < 0.1f) x = std::numeric_limits<float>::quiet_NaN();
  }
  return v;
}

at::Tensor to_tensor(const std::vector<float>& v, int64_t B, int64_t N) {
  return at::from_blob(const_cast<float*>(v.data()), {B, N}, at::kFloat).clone();
}

// Brute force: indices of the k best (NaN lowest, ties to the lower index), ascending.
std::vector<int64_t> brute_topk(const float* row, int64_t n, int64_t k) {
  std::vector<int64_t> order(n);
  std::iota(order.begin(), order.end(), 0);
  auto better = [&](int64_t a, int64_t b) {
    const float x = row[a], y = row[b];
    const bool xn = std::isnan(x), yn = std::isnan(y);
    if (xn != yn) return yn;        // a number beats NaN
    if (!xn && x != y) return x > y;
    return a < b;                   // equal (or both NaN): lower index first
  };
  std::sort(order.begin(), order.end(), better);
  order.resize(k);
  std::sort(order.begin(), order.end());
  return order;
}

// Brute force quantile (torch.quantile linear) of the non-NaN values, via a full sort.
float brute_quantile(std::vector<float> v, float q) {
  v.erase(std::remove_if(v.begin(), v.end(), [](float x) { return std::isnan(x); }), v.end());
  if (v.empty()) return std::numeric_limits<float>::quiet_NaN();
  std::sort(v.begin(), v.end());
  int64_t below;
  float w;
  epic::quantile_rank(q, static_cast<int64_t>(v.size()), &below, &w);
  const float lo = v[below], hi = w > 0 ? v[below + 1] : lo;
  return epic::quantile_lerp(lo, hi, w);
}

void test_select_topk() {
  for (int64_t n : {1, 7, 577, 2880}) {
    for (bool ties : {false, true}) {
      const int64_t B = 3;
      auto v = random_row(B * n, ties, !ties);
      at::Tensor s = to_tensor(v, B, n);
      for (int64_t k : {int64_t(0), int64_t(1), n / 3, n}) {
        at::Tensor idx = epic::select_topk_cpu(s, k);
        for (int64_t b = 0; b < B; ++b) {
          auto want = brute_topk(v.data() + b * n, n, k);
          bool same = true;
          for (int64_t j = 0; j < k; ++j) same &= idx[b][j].item<int64_t>() == want[j];
          EXPECT(same, "select_topk n=%ld k=%ld ties=%d row=%ld", long(n), long(k), int(ties), long(b));
        }
      }
    }
  }
}

void test_iqr_select() {
  for (int64_t n : {1, 7, 576, 2880}) {
    const int64_t B = 4;
    auto v = random_row(B * n, false, true);
    at::Tensor s = to_tensor(v, B, n);
    auto [counts, indices] = epic::iqr_select_cpu(s, 1.5, false, -1);
    for (int64_t b = 0; b < B; ++b) {
      std::vector<float> row(v.begin() + b * n, v.begin() + (b + 1) * n);
      const float fence = epic::iqr_fence(brute_quantile(row, 0.25f), brute_quantile(row, 0.75f), 1.5f);
      std::vector<int64_t> want;
      for (int64_t i = 0; i < n; ++i)
        if (row[i] > fence) want.push_back(i);
      EXPECT(counts[b].item<int64_t>() == int64_t(want.size()), "iqr count n=%ld row=%ld", long(n), long(b));
      bool same = true;
      for (int64_t j = 0; j < n; ++j) {
        const int64_t expect = j < int64_t(want.size()) ? want[j] : -1;
        same &= indices[b][j].item<int64_t>() == expect;
      }
      EXPECT(same, "iqr indices n=%ld row=%ld", long(n), long(b));
    }
    // Pooled: one fence for all rows, floor(outliers / B) per row, each row its own best.
    auto [pc, pi] = epic::iqr_select_cpu(s, 1.5, true, -1);
    const float fence = epic::iqr_fence(brute_quantile(v, 0.25f), brute_quantile(v, 0.75f), 1.5f);
    int64_t outliers = 0;
    for (float x : v) outliers += x > fence;
    for (int64_t b = 0; b < B; ++b) {
      EXPECT(pc[b].item<int64_t>() == outliers / B, "pooled count n=%ld", long(n));
      auto want = brute_topk(v.data() + b * n, n, outliers / B);
      bool same = true;
      for (int64_t j = 0; j < int64_t(want.size()); ++j) same &= pi[b][j].item<int64_t>() == want[j];
      EXPECT(same, "pooled indices n=%ld row=%ld", long(n), long(b));
    }
  }
}

// out[b] = rows idx[b, :valid], then the merge of the unreferenced rows, then zeros.
void test_gather_merge_and_backward() {
  const int64_t B = 2, N = 37, D = 13, K = 9;
  at::manual_seed(7);
  at::Tensor tokens = at::randn({B, N, D});
  at::Tensor weights = at::rand({B, N});
  at::Tensor idx = at::randint(0, N, {B, K}, at::kLong);
  at::Tensor counts = at::tensor({int64_t(4), int64_t(9)}, at::kLong);
  for (int64_t merge : {0, 1, 2}) {
    at::Tensor out = epic::gather_merge_cpu(tokens, idx, counts, merge, weights);
    at::Tensor grad_out = at::randn(out.sizes());
    at::Tensor grad = epic::gather_merge_backward_cpu(grad_out, idx, counts, merge, weights, N);
    for (int64_t b = 0; b < B; ++b) {
      const int64_t valid = counts[b].item<int64_t>();
      std::vector<bool> referenced(N, false);
      for (int64_t j = 0; j < valid; ++j) referenced[idx[b][j].item<int64_t>()] = true;
      const int64_t dropped = std::count(referenced.begin(), referenced.end(), false);
      for (int64_t d = 0; d < D; ++d) {
        for (int64_t j = 0; j < valid; ++j)
          EXPECT(out[b][j][d].item<float>() == tokens[b][idx[b][j].item<int64_t>()][d].item<float>(),
                 "kept row merge=%ld", long(merge));
        double merged = 0;
        for (int64_t n = 0; n < N; ++n)
          if (!referenced[n])
            merged += (merge == 2 ? weights[b][n].item<float>() : 1.0) * tokens[b][n][d].item<float>();
        if (merge == 1) merged = dropped ? merged / dropped : 0.0;
        if (merge != 0)
          EXPECT(std::abs(out[b][valid][d].item<float>() - merged) < 1e-5, "merged row merge=%ld",
                 long(merge));
        for (int64_t j = valid + (merge != 0); j < out.size(1); ++j)
          EXPECT(out[b][j][d].item<float>() == 0.0f, "padding row merge=%ld", long(merge));
        // Backward: kept rows sum their grads; dropped rows receive the merged row's grad.
        for (int64_t n = 0; n < N; ++n) {
          double want = 0;
          for (int64_t j = 0; j < valid; ++j)
            if (idx[b][j].item<int64_t>() == n) want += grad_out[b][j][d].item<float>();
          if (!referenced[n] && merge != 0) {
            const double gm = grad_out[b][valid][d].item<float>();
            want = merge == 1 ? gm / dropped : weights[b][n].item<float>() * gm;
          }
          EXPECT(std::abs(grad[b][n][d].item<float>() - want) < 1e-5, "grad merge=%ld n=%ld",
                 long(merge), long(n));
        }
      }
    }
  }
}

// A row that idx repeats sums its slots' gradients in fp32 and rounds once: bf16 grads 1, 2^-8,
// -1 give 2^-8 (rounding after each addition gives 0). N = 0 with counts 0: zero merged row.
void test_gather_merge_repeated_rows_and_no_tokens() {
  at::Tensor idx = at::tensor({int64_t(1), int64_t(1), int64_t(1)}, at::kLong).view({1, 3});
  at::Tensor grad_out = at::tensor({1.0f, 1.0f / 256, -1.0f}).view({1, 3, 1}).to(at::kBFloat16);
  at::Tensor grad = epic::gather_merge_backward_cpu(grad_out, idx, std::nullopt, 0, std::nullopt, 2);
  EXPECT(grad[0][1][0].item<float>() == 1.0f / 256, "repeated row grad %g", grad[0][1][0].item<float>());
  EXPECT(grad[0][0][0].item<float>() == 0.0f, "unreferenced row grad");
  at::Tensor none = at::randn({2, 0, 3});
  at::Tensor out = epic::gather_merge_cpu(none, at::full({2, 2}, -1, at::kLong),
                                          at::zeros({2}, at::kLong), 1, std::nullopt);
  EXPECT(out.sizes() == at::IntArrayRef({2, 3, 3}) && at::equal(out, at::zeros({2, 3, 3})),
         "N = 0 gives zeros");
}

void test_compress_matches_parts() {
  at::manual_seed(3);
  at::Tensor tokens = at::randn({3, 577, 33}).to(at::kBFloat16);
  at::Tensor scores = at::randn({3, 577});
  auto [out, idx] = epic::compress_topk_cpu(tokens, scores, 64, 1, std::nullopt);
  EXPECT(at::equal(idx, epic::select_topk_cpu(scores, 64)), "compress idx");
  EXPECT(at::equal(out, epic::gather_merge_cpu(tokens, idx, std::nullopt, 1, std::nullopt)),
         "compress == select + gather_merge");
}

template <typename F>
void expect_value_error(F f, const std::string& words) {
  try {
    f();
    EXPECT(false, "no exception, expected '%s'", words.c_str());
  } catch (const c10::ValueError& e) {
    EXPECT(std::string(e.what()).find(words) != std::string::npos, "message lacks '%s': %s",
           words.c_str(), e.what());
  }
}

void test_errors() {
  at::Tensor tokens = at::randn({2, 7, 3});
  at::Tensor scores = at::randn({2, 7});
  expect_value_error([&] { epic::select_topk_cpu(scores, 8); }, "k must be in");
  expect_value_error([&] { epic::select_topk_cpu(scores, -1); }, "k must be in");
  expect_value_error([&] { epic::select_topk_cpu(tokens, 1); }, "scores must be 2-D");
  expect_value_error(
      [&] { epic::gather_merge_cpu(tokens, at::full({2, 2}, 7, at::kLong), std::nullopt, 1, std::nullopt); },
      "out of range");
  expect_value_error(
      [&] { epic::gather_merge_cpu(tokens, at::zeros({2, 2}, at::kLong), at::full({2}, 3, at::kLong), 1, std::nullopt); },
      "counts");
  expect_value_error([&] { epic::gather_merge_cpu(tokens, at::zeros({2, 2}, at::kLong), std::nullopt, 2, std::nullopt); },
                     "weights are required");
  expect_value_error([&] { epic::compress_topk_cpu(tokens, at::randn({2, 6}), 2, 1, std::nullopt); },
                     "scores must be");
}

}  // namespace

int main() {
  test_select_topk();
  test_iqr_select();
  test_gather_merge_and_backward();
  test_gather_merge_repeated_rows_and_no_tokens();
  test_compress_matches_parts();
  test_errors();
  std::printf("%d checks, %d failures\n", g_checks, g_failures);
  return g_failures == 0 ? 0 : 1;
}
