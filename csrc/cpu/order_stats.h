// Exact order statistics of score rows, fast: the engine behind the CPU iqr_select / select_topk.
//
// The score of rank r (0-based, ascending in float_key order) of n scores is found by keeping
// a bracket of keys (lo, hi] that provably holds it, with exact counts dlo = #{key <= lo} <= r <
// dhi = #{key <= hi}, and shrinking it with passes that count the scores above 2 or 4 pivot
// keys per query (two queries share a pass):
//   - while a side is unbounded, pivots are sample keys next to and ~1 deviation either side
//     of r's place in a small sorted sample (one sample serves every round and query);
//   - then pivots come from a model of the bracket, a margin of ~sqrt(bracket size) ranks
//     either side of the target: the sample keys inside it cut it into gaps of equal count,
//     each spread evenly in key space (keys are ~log|x|, which suits tails) or, across 0, in
//     score value. A side that misses gets a 4x wider margin (a skewed bracket would otherwise
//     let pivots creep up on the target, as in regula falsi).
// Once a query's bracket is bounded, its next pass over more than kCompactMin scores also copies
// the bracket's scores out (into the query's spare buffer of two), and later passes scan only
// that copy: at most two passes over a row (the sample's and that one), then a few dozen scores.
// The search ends in one of three ways: a pivot with exactly r + 1 scores at or below it
// separates s_r from s_r+1, which one max/min pass reads; the bracket can hold one key only;
// or it holds at most kCollectAt scores, which are collected and sorted (a bitonic network). A
// bracket that stops shrinking (ties, adversarial data) is collected as it is and finished with
// nth_element, so speed depends on the data, exactness never does.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "cpu_kernels.h"

namespace epic::cpu {

// One query: the keys of ranks r and r2 (r2 == r or r + 1) of n scores, nan of them NaN
// (ranks below nan are NaN; r >= nan unless r2 < nan).
struct RankQuery {
  int64_t r = 0, r2 = 0;
  // Bracket (lo, hi] with dlo = #{key <= lo} <= r and dhi = #{key <= hi} > r2.
  int64_t lo = kNanKey, hi = kPlusInfKey;
  int64_t dlo = 0, dhi = 0;
  bool lo_set = false, hi_set = false;  // bound found in the data (the model needs both)
  int miss[2] = {0, 0};                 // consecutive passes a model pivot fell on the wrong side
  bool split = false;                   // s_r <= split_at < s_r2
  int64_t split_at = 0;
  bool done = false;
  int32_t v = 0, v2 = 0;  // the results: keys of ranks r and r2
  // The scores still scanned: all of them, or a copy of those with keys in some (A, B]
  // containing the bracket; #{key <= p} = base + #{arr <= p} for p in (A, B].
  const float* arr = nullptr;
  int64_t len = 0, base = 0;

  static RankQuery make(int64_t r, int64_t r2, int64_t n, int64_t nan) {
    RankQuery q;
    q.r = r, q.r2 = r2, q.dlo = nan, q.dhi = n;
    if (r2 < nan) q.v = q.v2 = kNanKey, q.done = true;
    return q;
  }
  int64_t size() const { return dhi - dlo; }
  bool active() const { return !done && !split; }
  // Record #{key <= p} = d for pivot p. A model pivot is meant to fall below r (side 0) or
  // above r2 (side 1); side -1: a sample pivot, no such intent.
  void update(int64_t p, int64_t d, int side) {
    if (d <= r && p > lo) lo = p, dlo = d, lo_set = true;
    else if (d > r2 && p < hi) hi = p, dhi = d, hi_set = true;
    else if (d > r && d <= r2) split = true, split_at = p;  // d == r + 1
    if (side >= 0) miss[side] = (side == 0 ? d > r : d <= r2) ? miss[side] + 1 : 0;
  }
};

// Tuning, measured on 64 x 576 and 16 x 2880 rows of randn, randn^3 and softmax scores.
constexpr int64_t kCollectAt = 32;     // collect a bracket once it holds at most this many keys
constexpr int64_t kCompactMin = 64;    // passes over more scores copy out their bracket
constexpr int kMaxRounds = 12;         // passes before brackets are collected as they are
constexpr double kMarginSqrt = 1.0;    // model margin, in sqrt(bracket size) ranks
constexpr double kSampleSigmas = 1.0;  // first-round outer pivots, in sample-rank deviations

// Sample size for n scores: enough that the first pass lands close, small enough to sort fast.
inline int sample_size(int64_t n) {
  return n < 2048 ? 16 : n < 8192 ? 32 : n < 32768 ? 64 : n < (int64_t(1) << 20) ? 128 : 256;
}

// sorted = x[0..M) in ascending order, for samples too large for sort_small. Each value's rank
// is counted among the others (ties by position): M^2 compares, but vectorised and branch-free,
// cheaper than a comparison sort at these sizes.
template <int M>
inline void rank_sort(const int32_t* x, int32_t* sorted) {
  int32_t rank[M] = {};
  for (int i = 0; i < M; ++i)
    for (int j = 0; j < M; ++j) rank[j] += (x[i] < x[j]) | ((x[i] == x[j]) & (i < j));
  for (int j = 0; j < M; ++j) sorted[rank[j]] = x[j];
}

template <int M>
inline void sorted_sample_of(const float* x, int64_t n, int32_t* sample) {
  int32_t k[M];
  for (int i = 0; i < M; ++i) k[i] = score_key(x[(2 * i + 1) * n / (2 * M)]);
  rank_sort<M>(k, sample);
}

// Sorted keys of m (a sample_size value) scores spread evenly over x[0..n); `sample` has room
// for max(m, 32).
template <bool kAvx2>
inline void sorted_sample(const float* x, int64_t n, int m, int32_t* sample) {
  if (m <= 32) {
    for (int i = 0; i < m; ++i) sample[i] = score_key(x[(2 * i + 1) * n / (2 * m)]);
    return sort_small<kAvx2>(sample, m);
  }
  switch (m) {
    case 64: return sorted_sample_of<64>(x, n, sample);
    case 128: return sorted_sample_of<128>(x, n, sample);
    default: return sorted_sample_of<256>(x, n, sample);
  }
}

// The key at fraction f of the way from key lo to key hi. Keys are ~log|x|: linear in them
// suits a stretch on one side of 0 (tails spread like powers); one across 0 is interpolated in
// score value instead (keys would put pivots in the empty stretch around 0).
inline int64_t interpolate_key(int64_t lo, int64_t hi, float f) {
  if ((lo < 0) != (hi < 0) && lo >= kMinusInfKey) {
    const float x0 = key_score(static_cast<int32_t>(lo)), x1 = key_score(static_cast<int32_t>(hi));
    if (std::isfinite(x1 - x0)) return score_key(x0 + (x1 - x0) * f);
  }
  return lo + static_cast<int64_t>(static_cast<float>(hi - lo) * f);
}

// The model of a bounded bracket: the sample keys strictly inside (lo, hi) cut it into gaps of
// equal count, each interpolated as above.
struct BracketModel {
  const int32_t* knots;  // sample keys inside the bracket
  int gaps;              // knots + 1
  int64_t lo, hi, dlo;
  float per_gap;         // bracket keys per gap
  BracketModel(const RankQuery& q, const int32_t* sample, int m) : lo(q.lo), hi(q.hi), dlo(q.dlo) {
    // Knots: sample keys in (lo + 1, hi). A first-pass bound lo is a sample key minus 1: that
    // key bounds the bracket rather than cutting it.
    const int32_t l = static_cast<int32_t>(std::clamp<int64_t>(q.lo + 1, INT32_MIN, INT32_MAX));
    const int32_t h = static_cast<int32_t>(q.hi);
    int32_t ja = 0, jb = 0;  // sample keys <= lo + 1, < hi (m is small: counting vectorises)
    for (int j = 0; j < m; ++j) ja += sample[j] <= l, jb += sample[j] < h;
    knots = sample + ja, gaps = jb - ja + 1;
    per_gap = static_cast<float>(q.size()) / static_cast<float>(gaps);
  }
  // The pivot below which the model puts t keys in all (dlo < t < dhi).
  int64_t pivot(float t) const {
    const float u = (t - static_cast<float>(dlo)) / per_gap;
    const int i = std::clamp(static_cast<int>(u), 0, gaps - 1);
    const int64_t x0 = i == 0 ? lo : knots[i - 1], x1 = i == gaps - 1 ? hi : knots[i];
    return interpolate_key(x0, x1, std::clamp(u - static_cast<float>(i), 0.0f, 1.0f));
  }
};

// Ascending pivot keys for the next pass of query q over n scores, inside [lo, hi] (a pivot on
// a bound is harmless and teaches nothing); returns how many: 2 from the model (one meant below
// r, one above r2), 4 from the sample.
inline int propose_pivots(const RankQuery& q, int64_t n, const int32_t* sample, int m, int round,
                          int64_t piv[4]) {
  if (q.lo_set && q.hi_set) {
    // A missed side's margin grows 4x per miss, but at most half the way to its bound (in
    // rank), so the bracket keeps shrinking geometrically whatever the data.
    const float K = static_cast<float>(q.size());
    const float g = std::ceil(static_cast<float>(kMarginSqrt) * std::sqrt(K));
    const float a = static_cast<float>(q.r - q.dlo), b = static_cast<float>(q.r2 + 1 - q.dlo);
    const float a0 = std::max(a - g * static_cast<float>(1 << (2 * std::min(q.miss[0], 4))), 0.5f * a);
    const float b1 = std::min(b + g * static_cast<float>(1 << (2 * std::min(q.miss[1], 4))), 0.5f * (b + K));
    const BracketModel model(q, sample, m);
    const float d = static_cast<float>(q.dlo);
    piv[0] = a0 > 0.0f ? model.pivot(d + a0) : q.lo;
    piv[1] = b1 < K ? model.pivot(d + b1) : q.hi;
    for (int p = 0; p < 2; ++p) piv[p] = std::clamp(piv[p], q.lo, q.hi);
    return 2;
  }
  // r's rank in the sample deviates from its expected place c = (r + 1/2) m / n - 1/2 by
  // ~sqrt(m) / 2 (sigma): the sample keys next to c and ~kSampleSigmas sigma out bracket it
  // within a sample gap or two mostly, with exact counts for the model. Further out each round
  // in case the sample was unlucky; past the sample's ends, its extremes.
  const double sigma = 0.5 * std::sqrt(static_cast<double>(m));
  const int64_t d = static_cast<int64_t>(std::ceil(kSampleSigmas * sigma)) * (1 + round);
  const int64_t c0 = static_cast<int64_t>(std::floor((q.r + 0.5) * m / n - 0.5));
  const int64_t c1 = static_cast<int64_t>(std::ceil((q.r2 + 0.5) * m / n - 0.5));
  const int64_t j[4] = {c0 - d, c0, c1, c1 + d};
  for (int p = 0; p < 4; ++p) {
    const int64_t key = sample[std::clamp<int64_t>(j[p], 0, m - 1)];
    piv[p] = std::clamp(p < 2 ? key - 1 : key, q.lo, q.hi);
  }
  return 4;
}

// Finish q from its collected bracket buf[0..size) (all scores in (lo, hi], unordered).
template <bool kAvx2>
inline void finish_from_bracket(RankQuery& q, const float* buf) {
  const int64_t K = q.size(), i = q.r - q.dlo, i2 = q.r2 - q.dlo;
  if (K <= 32) {
    int32_t keys[32];
    for (int64_t j = 0; j < K; ++j) keys[j] = score_key(buf[j]);
    sort_small<kAvx2>(keys, K);
    q.v = keys[i], q.v2 = keys[i2];
  } else {  // only after a stuck search
    std::vector<int32_t> keys(K);
    for (int64_t j = 0; j < K; ++j) keys[j] = score_key(buf[j]);
    std::nth_element(keys.begin(), keys.begin() + i, keys.end());
    if (i2 > i) std::nth_element(keys.begin() + i + 1, keys.begin() + i2, keys.end());
    q.v = keys[i], q.v2 = keys[i2];
  }
  q.done = true;
}

// One search pass over the array shared by queries qs[0..nq), each with NP pivots piv[4t..].
// Once a query's bracket is bounded, a pass over more than kCompactMin scores also copies the
// scores of the bracket (lo, hi] to out[t], and later passes scan only that copy: at most two
// passes over a row (the sample's, then this one), whatever the model's luck.
template <bool kAvx2, int NP>
inline void search_pass(RankQuery** qs, int nq, const int64_t* piv, float** out) {
  const float* arr = qs[0]->arr;
  const int64_t len = qs[0]->len;
  int64_t above[2][NP];
  RangePass<NP> rp[2];
  bool compact = len > kCompactMin;
  for (int t = 0; t < nq; ++t) {
    for (int p = 0; p < NP; ++p) rp[t].f[p] = at_least(piv[4 * t + p]);
    compact &= qs[t]->lo_set && qs[t]->hi_set;
  }
  if (compact) {
    for (int t = 0; t < nq; ++t) {
      rp[t].keep_lo = at_least(qs[t]->lo), rp[t].keep_hi = at_least(qs[t]->hi);
      rp[t].out = out[t];
    }
    range_pass<kAvx2, NP>(arr, len, rp, nq);
    for (int t = 0; t < nq; ++t) std::copy(rp[t].above, rp[t].above + NP, above[t]);
  } else {
    float f[2 * NP];
    int64_t a[2 * NP];
    for (int t = 0; t < nq; ++t) std::copy(rp[t].f, rp[t].f + NP, f + NP * t);
    if (nq == 2) count_above<2 * NP>(arr, len, f, a);
    else count_above<NP>(arr, len, f, a);
    for (int t = 0; t < nq; ++t) std::copy(a + NP * t, a + NP * (t + 1), above[t]);
  }
  for (int t = 0; t < nq; ++t) {
    RankQuery& q = *qs[t];
    const int64_t below_arr = q.base + len, dlo_before = q.dlo;  // #{key <= p} = below_arr - above
    const bool from_model = q.lo_set && q.hi_set;  // misses are counted for model pivots only
    for (int p = 0; p < NP; ++p) q.update(piv[4 * t + p], below_arr - above[t][p], from_model ? p : -1);
    if (compact) q.arr = out[t], q.len = rp[t].kept, q.base = dlo_before;  // the old (lo, hi]
  }
}

// Answer nq (1 or 2) queries over the scores x[0..n). `sample` has room for m keys; query t
// owns the buffers bufs[2t] and bufs[2t + 1], each with room for n + 8 scores.
template <bool kAvx2>
inline void select_ranks(const float* x, int64_t n, RankQuery* qs, int nq, int32_t* sample, int m,
                         float* const* bufs) {
  while (m > 16 && m > n) m /= 2;  // a sample larger than the array is pointless
  if (m > n) m = 0;                 // tiny arrays: no search, collect them right away
  bool sampled = false, stuck[2] = {false, false};
  for (int t = 0; t < nq; ++t)
    if (!qs[t].arr) qs[t].arr = x, qs[t].len = n, qs[t].base = 0;
  for (int round = 0; round < kMaxRounds; ++round) {
    RankQuery* live[2];
    int64_t piv[8];
    int np[2], nlive = 0;
    for (int t = 0; t < nq; ++t) {
      RankQuery& q = qs[t];
      if (!q.active() || stuck[t]) continue;
      if (q.hi - q.lo == 1) {  // the bracket can hold one key only
        q.v = q.v2 = static_cast<int32_t>(q.hi), q.done = true;
        continue;
      }
      if (q.size() <= kCollectAt || m == 0) continue;
      if (!sampled) sorted_sample<kAvx2>(x, n, m, sample), sampled = true;
      np[nlive] = propose_pivots(q, n, sample, m, round, piv + 4 * nlive);
      live[nlive++] = &q;
    }
    if (nlive == 0) break;
    const int64_t before[4] = {live[0]->lo, live[0]->hi, live[nlive - 1]->lo, live[nlive - 1]->hi};
    float* out[2];  // the live queries' spare buffers
    for (int t = 0; t < nlive; ++t) {
      float* const* own = bufs + 2 * (live[t] - qs);
      out[t] = live[t]->arr == own[0] ? own[1] : own[0];
    }
    if (nlive == 2 && live[0]->arr == live[1]->arr && np[0] == np[1]) {
      if (np[0] == 2) search_pass<kAvx2, 2>(live, 2, piv, out);
      else search_pass<kAvx2, 4>(live, 2, piv, out);
    } else {
      for (int t = 0; t < nlive; ++t) {
        if (np[t] == 2) search_pass<kAvx2, 2>(live + t, 1, piv + 4 * t, out + t);
        else search_pass<kAvx2, 4>(live + t, 1, piv + 4 * t, out + t);
      }
    }
    // A pass that only narrowed the key range (an empty stretch) still counts as progress.
    for (int t = 0; t < nlive; ++t)
      stuck[live[t] - qs] = live[t]->lo == before[2 * t] && live[t]->hi == before[2 * t + 1];
  }
  for (int t = 0; t < nq; ++t) {
    RankQuery& q = qs[t];
    if (q.split) {
      max_min_around(q.arr, q.len, at_least(q.split_at), &q.v, &q.v2);
      q.done = true;
    } else if (!q.done) {
      // Collect the bracket's scores: from a copy in place (writes trail reads), else into a
      // spare buffer.
      float* out = q.arr == x ? bufs[2 * t] : const_cast<float*>(q.arr);
      RangePass<2> rp;
      rp.f[0] = rp.keep_lo = at_least(q.lo), rp.f[1] = rp.keep_hi = at_least(q.hi), rp.out = out;
      range_pass<kAvx2, 2>(q.arr, q.len, &rp, 1);
      finish_from_bracket<kAvx2>(q, out);
    }
  }
}

}  // namespace epic::cpu
