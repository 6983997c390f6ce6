// CPU kernel of attn_scores: softmax probabilities of a few query rows over a key span, summed or
// averaged over heads and rows, without a [B, H, Q, L] score matrix. Contract in ops.h.
//
// Work unit: (sample b, kv head) with its R = (H / Hkv) * Q query rows (contiguous in the fp32
// copy of q), so each key row is loaded once for every query head that reads it (GQA). Only keys
// some row sees, [kv_start, max q_pos], are read. Per unit, row tiles of kRowTile rows stream the
// keys in blocks of kKeyBlock: the block's scores (8-lane dot products) go to a small scratch, from
// which
//   - without lse: each row's online (max, sum exp) is updated over its visible keys, and the raw
//     scores of span keys are kept in a [rows, key_len] buffer; once the row's lse is known,
//     p = exp(s - lse) over the visible span is added to the unit's partial output row;
//   - with lse (one pass): p is added to the partial output row straight away.
// Few units for the threads (B * Hkv small, e.g. PruMerge's single 1024-wide head): the key range
// of a unit is split in C chunks run in parallel; their (max, sum) partials are merged in chunk
// order in a second phase that reads the span scores back from a [units, R, key_len] buffer.
// Items (unit, chunk) are handed to the threads one at a time; below 4 MiB of K everything runs
// on the calling thread. Finally out[b, t] sums the units of sample b in kv-head order
// (deterministic for a given thread count: no float atomics, fixed orders); span
// entries outside [0, L) are NaN. Index values are never trusted: every key index used for a load
// is inside [0, L).
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <memory>

#include "epic/checks.h"
#include "epic/ops.h"
#include "vec8.h"

namespace epic {

namespace {

using namespace cpu::vec8;

constexpr int64_t kRowTile = 16;   // rows per tile: the score scratch and span buffer height
constexpr int64_t kKeyBlock = 64;  // keys per block of scores (scratch 16 x 64 fp32 = 4 KiB)
constexpr int64_t kPrefetchKeys = 8;  // software prefetch distance in key rows
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

struct Plan {
  int64_t B, H, Q, d, Hkv, L, g, R, key_len, C;
  const float* q;    // fp32 [B, H, Q, d] contiguous: unit u's rows start at u * R
  const float* lse;  // fp32 [B, H, Q] contiguous, or null
  const int64_t* key_start;
  int64_t key_start_int;
  const int64_t* kv_start;
  int64_t kv_start_int;
  const int64_t* q_pos;  // [B, Q] or null
  bool causal;
  float scale;
  int64_t sk0, sk1, sk2;  // k strides (elements); the last one is 1
  float* partial;         // [B * Hkv, key_len]: the unit's sum over its rows
  float* stats;           // [B * Hkv, C, R, 2] (max, sum) when C > 1 and no lse
  float* span;            // [B * Hkv, R, key_len] raw span scores when C > 1 and no lse
};

struct Unit {
  int64_t b, lo, hi_max, ks;  // visible keys of some row: [lo, hi_max]; span start ks
  const float* q;             // the unit's first query row
  const float* lse;           // the unit's first lse entry, or null
};

EPIC_VEC_INLINE int64_t row_hi(const Plan& p, int64_t b, int64_t r) {
  if (!p.causal) return p.L - 1;
  const int64_t i = r % p.Q;
  const int64_t pos = p.q_pos ? p.q_pos[b * p.Q + i] : p.L - p.Q + i;
  return std::max<int64_t>(std::min(pos, p.L - 1), -1);  // clamped: unchecked values never overflow
}

// Span start of sample b, clamped to [-key_len, L]: the same entries fall outside [0, L), and
// unchecked values never overflow.
EPIC_VEC_INLINE int64_t span_start(const Plan& p, int64_t b) {
  const int64_t ks = p.key_start ? p.key_start[b] : p.key_start_int;
  return std::min(std::max(ks, -p.key_len), p.L);
}

EPIC_VEC_INLINE Unit unit_of(const Plan& p, int64_t u) {
  Unit s;
  s.b = u / p.Hkv;
  const int64_t kv0 = p.kv_start ? p.kv_start[s.b] : p.kv_start_int;
  s.lo = std::min(std::max<int64_t>(kv0, 0), p.L);
  s.hi_max = -1;
  for (int64_t i = 0; i < p.Q; ++i) s.hi_max = std::max(s.hi_max, row_hi(p, s.b, i));
  s.ks = span_start(p, s.b);
  s.q = p.q + u * p.R * p.d;
  s.lse = p.lse ? p.lse + u * p.R : nullptr;
  return s;
}

// out[r * kKeyBlock + c] = <q row r, key c> for NR rows (row stride d) and NK keys: NR * NK
// independent lane accumulators (an add chain per key and row would be latency-bound), every
// key vector loaded and converted once for the NR rows. Lanes are folded pairwise.
template <typename T, int NR, int NK>
EPIC_VEC_INLINE void dot_tile(const T* const* k, const float* q, int64_t d, int64_t ahead,
                              float* out) {
  v8f acc[NR][NK];
  for (int r = 0; r < NR; ++r)
    for (int c = 0; c < NK; ++c) acc[r][c] = splat(0.0f);
  const int64_t dl = d - d % kLanes;
  for (int64_t e = 0; e < dl; e += kLanes) {
    v8f kv[NK];
    for (int c = 0; c < NK; ++c) {
      // The stream of key rows is what the kernel waits on: ask for the rows `ahead` elements
      // on (a few keys later) while these are summed.
      __builtin_prefetch(k[c] + e + ahead);
      kv[c] = load8(k[c] + e);
    }
    for (int r = 0; r < NR; ++r) {
      const v8f qv = load8(q + r * d + e);
      for (int c = 0; c < NK; ++c) acc[r][c] += qv * kv[c];
    }
  }
  for (int r = 0; r < NR; ++r)
    for (int c = 0; c < NK; ++c) {
      float s = hsum(acc[r][c]);
      for (int64_t e = dl; e < d; ++e) s += q[r * d + e] * static_cast<float>(k[c][e]);
      out[r * kKeyBlock + c] = s;
    }
}

// One row (MHA with one query: most calls) against one key: four lane accumulators along d, so
// the key rows are read strictly in address order, plus a software prefetch `ahead` elements on
// (measured: ~1.4x the bandwidth of the interleaved multi-key tile on one core).
template <typename T>
EPIC_VEC_INLINE float dot_one(const T* k, const float* q, int64_t d, int64_t ahead) {
  v8f a0 = splat(0.0f), a1 = a0, a2 = a0, a3 = a0;
  const int64_t d4 = d - d % (4 * kLanes);
  for (int64_t e = 0; e < d4; e += 4 * kLanes) {
    __builtin_prefetch(k + e + ahead);
    __builtin_prefetch(k + e + ahead + 2 * kLanes);
    a0 += load8(q + e) * load8(k + e);
    a1 += load8(q + e + kLanes) * load8(k + e + kLanes);
    a2 += load8(q + e + 2 * kLanes) * load8(k + e + 2 * kLanes);
    a3 += load8(q + e + 3 * kLanes) * load8(k + e + 3 * kLanes);
  }
  const int64_t dl = d - d % kLanes;
  for (int64_t e = d4; e < dl; e += kLanes) a0 += load8(q + e) * load8(k + e);
  float s = hsum((a0 + a1) + (a2 + a3));
  for (int64_t e = dl; e < d; ++e) s += q[e] * static_cast<float>(k[e]);
  return s;
}

// Rows [r, r + NR) of the tile against keys [j0, j1), NK keys at a time.
template <typename T, int NR, int NK>
EPIC_VEC_INLINE void dot_rows(const Plan& p, const T* kb, const float* q, int64_t j0, int64_t j1,
                              float* S) {
  int64_t j = j0;
  for (; j + NK <= j1; j += NK) {
    const T* ks[NK];
    for (int c = 0; c < NK; ++c) ks[c] = kb + (j + c) * p.sk2;
    dot_tile<T, NR, NK>(ks, q, p.d, kPrefetchKeys * p.sk2, S + (j - j0));
  }
  for (; j < j1; ++j) {
    const T* ks[1] = {kb + j * p.sk2};
    dot_tile<T, NR, 1>(ks, q, p.d, kPrefetchKeys * p.sk2, S + (j - j0));
  }
}

// S[r * kKeyBlock + (j - j0)] = scale <q_r, k_j> for rows [0, rt) of the tile and keys [j0, j1).
template <typename T>
EPIC_VEC_INLINE void block_scores(const Plan& p, const T* kb, const float* q, int64_t rt,
                                  int64_t j0, int64_t j1, float* S) {
  for (int64_t r = 0; r < rt; r += 4) {  // (rows, keys) per tile: 8 or 9 accumulators (GQA, Q > 1)
    const float* qr = q + r * p.d;
    float* Sr = S + r * kKeyBlock;
    switch (std::min<int64_t>(4, rt - r)) {
      case 4: dot_rows<T, 4, 2>(p, kb, qr, j0, j1, Sr); break;
      case 3: dot_rows<T, 3, 3>(p, kb, qr, j0, j1, Sr); break;
      case 2: dot_rows<T, 2, 4>(p, kb, qr, j0, j1, Sr); break;
      default:
        for (int64_t j = j0; j < j1; ++j) Sr[j - j0] = dot_one(kb + j * p.sk2, qr, p.d, kPrefetchKeys * p.sk2);
        break;
    }
  }
  const int64_t n = j1 - j0;
  for (int64_t r = 0; r < rt; ++r)
    for (int64_t c = 0; c < n; ++c) S[r * kKeyBlock + c] *= p.scale;
}

// dst[t] += exp(src[t] - shift) for t in [0, n).
EPIC_VEC_INLINE void add_exp(float* dst, const float* src, int64_t n, float shift) {
  const int64_t nl = n - n % kLanes;
  for (int64_t t = 0; t < nl; t += kLanes) store8(dst + t, load8(dst + t) + exp8(load8(src + t) - shift));
  for (int64_t t = nl; t < n; ++t) dst[t] += exp1(src[t] - shift);
}

// Online (max m, sum z) of one row over the scores x[0, n) (n >= 1).
EPIC_VEC_INLINE void online_update(const float* x, int64_t n, float& m, double& z) {
  const int64_t nl = n - n % kLanes;
  float bm = kNegInf;
  if (nl > 0) {
    v8f vm = load8(x);
    for (int64_t t = kLanes; t < nl; t += kLanes) {
      const v8f v = load8(x + t);
      vm = v > vm ? v : vm;
    }
    bm = hmax(vm);
  }
  for (int64_t t = nl; t < n; ++t) bm = std::max(bm, x[t]);
  if (bm > m) {
    z *= static_cast<double>(exp1(m - bm));  // m = -inf: 0
    m = bm;
  }
  if (m == kNegInf) return;  // only -inf scores so far: no mass
  v8f vs = splat(0.0f);
  for (int64_t t = 0; t < nl; t += kLanes) vs += exp8(load8(x + t) - m);
  float tail = 0.0f;
  for (int64_t t = nl; t < n; ++t) tail += exp1(x[t] - m);
  z += static_cast<double>(hsum(vs)) + static_cast<double>(tail);
}

// Span positions t in [t0, t1) of the row's visible keys [lo, hi] (empty when t1 <= t0).
EPIC_VEC_INLINE void visible_span(const Plan& p, const Unit& un, int64_t hi, int64_t* t0,
                                  int64_t* t1) {
  *t0 = std::max(un.lo - un.ks, int64_t(0));
  *t1 = std::min(hi - un.ks + 1, p.key_len);
}

// Adds exp(span_row[t] - lse) over the row's visible span to the unit's partial output row.
EPIC_VEC_INLINE void finalize_row(const Plan& p, const Unit& un, int64_t r, float lse,
                                  const float* span_row, float* part) {
  int64_t t0, t1;
  visible_span(p, un, row_hi(p, un.b, r), &t0, &t1);
  if (t1 > t0) add_exp(part + t0, span_row + t0, t1 - t0, lse);
}

// Phase 1: item = (unit, chunk). Rows in tiles, keys of the chunk in blocks.
template <typename T>
EPIC_VEC_INLINE void run_item(const Plan& p, const T* k, int64_t item) {
  const int64_t u = item / p.C, c = item % p.C;
  const Unit un = unit_of(p, u);
  const int64_t n = un.hi_max - un.lo + 1;  // keys some row sees
  if (n <= 0) return;
  const int64_t jb = un.lo + n * c / p.C, je = un.lo + n * (c + 1) / p.C;
  const T* kb = k + un.b * p.sk0 + (u % p.Hkv) * p.sk1;
  float* part = p.partial + u * p.key_len;
  const bool shared = p.C > 1 && !p.lse;  // span scores and stats go to the phase-2 buffers
  const int64_t s0 = std::max(jb, un.ks), s1 = std::min(je, un.ks + p.key_len);  // span keys here
  float S[kRowTile * kKeyBlock];  // 4 KiB, stays in L1
  // Span scores of one tile, uninitialised: only entries of visible keys are written and read.
  std::unique_ptr<float[]> tile_span(
      (!p.lse && !shared) ? new float[std::min(kRowTile, p.R) * p.key_len] : nullptr);
  for (int64_t r0 = 0; r0 < p.R; r0 += kRowTile) {
    const int64_t rt = std::min(kRowTile, p.R - r0);
    float m[kRowTile];
    double z[kRowTile];
    int64_t hi[kRowTile];
    for (int64_t r = 0; r < rt; ++r) m[r] = kNegInf, z[r] = 0.0, hi[r] = row_hi(p, un.b, r0 + r);
    float* span_rows = shared ? p.span + (u * p.R + r0) * p.key_len : tile_span.get();
    for (int64_t j0 = jb; j0 < je; j0 += kKeyBlock) {
      const int64_t j1 = std::min(je, j0 + kKeyBlock);
      block_scores(p, kb, un.q + r0 * p.d, rt, j0, j1, S);
      for (int64_t r = 0; r < rt; ++r) {
        const float* Sr = S + r * kKeyBlock;
        const int64_t e = std::min(j1, hi[r] + 1);  // visible keys of the row in this block
        if (p.lse) {
          const int64_t a = std::max(j0, un.ks), b = std::min(e, un.ks + p.key_len);
          if (b > a) add_exp(part + (a - un.ks), Sr + (a - j0), b - a, un.lse[r0 + r]);
        } else {
          if (e > j0) online_update(Sr, e - j0, m[r], z[r]);
          const int64_t a = std::max(j0, s0), b = std::min(j1, s1);
          if (b > a) std::memcpy(span_rows + r * p.key_len + (a - un.ks), Sr + (a - j0), (b - a) * sizeof(float));
        }
      }
    }
    if (p.lse) continue;
    if (shared) {
      float* st = p.stats + ((u * p.C + c) * p.R + r0) * 2;
      for (int64_t r = 0; r < rt; ++r) st[2 * r] = m[r], st[2 * r + 1] = static_cast<float>(z[r]);
    } else {
      for (int64_t r = 0; r < rt; ++r) {
        if (z[r] <= 0.0) continue;  // no visible key
        const float lse = static_cast<float>(static_cast<double>(m[r]) + std::log(z[r]));
        finalize_row(p, un, r0 + r, lse, span_rows + r * p.key_len, part);
      }
    }
  }
}

// Phase 2 (C > 1, no lse): merge the chunks' (max, sum) in chunk order, then add the rows.
EPIC_VEC_INLINE void run_merge(const Plan& p, int64_t u) {
  const Unit un = unit_of(p, u);
  if (un.hi_max < un.lo) return;  // phase 1 skipped the unit: no row sees a key
  float* part = p.partial + u * p.key_len;
  for (int64_t r = 0; r < p.R; ++r) {
    float M = kNegInf;
    for (int64_t c = 0; c < p.C; ++c) M = std::max(M, p.stats[((u * p.C + c) * p.R + r) * 2]);
    if (M == kNegInf) continue;  // no visible key (or only -inf scores)
    double Z = 0.0;
    for (int64_t c = 0; c < p.C; ++c) {
      const float* st = p.stats + ((u * p.C + c) * p.R + r) * 2;
      if (st[0] != kNegInf) Z += static_cast<double>(st[1]) * std::exp(static_cast<double>(st[0]) - M);
    }
    const float lse = static_cast<float>(static_cast<double>(M) + std::log(Z));
    finalize_row(p, un, r, lse, p.span + (u * p.R + r) * p.key_len, part);
  }
}

#define EPIC_ATTN_CLONE(NAME, T)                                                             \
  __attribute__((target_clones("avx2", "default"))) void NAME(const Plan& p, const T* k,       \
                                                              int64_t i0, int64_t i1) {         \
    for (int64_t i = i0; i < i1; ++i) run_item<T>(p, k, i);                                    \
  }
EPIC_ATTN_CLONE(attn_items_f32, float)
EPIC_ATTN_CLONE(attn_items_bf16, c10::BFloat16)
EPIC_ATTN_CLONE(attn_items_f16, c10::Half)
#undef EPIC_ATTN_CLONE

__attribute__((target_clones("avx2", "default"))) void attn_merge(const Plan& p, int64_t u0,
                                                                    int64_t u1) {
  for (int64_t u = u0; u < u1; ++u) run_merge(p, u);
}

inline void attn_items(const Plan& p, const float* k, int64_t a, int64_t b) { attn_items_f32(p, k, a, b); }
inline void attn_items(const Plan& p, const c10::BFloat16* k, int64_t a, int64_t b) {
  attn_items_bf16(p, k, a, b);
}
inline void attn_items(const Plan& p, const c10::Half* k, int64_t a, int64_t b) { attn_items_f16(p, k, a, b); }

}  // namespace

at::Tensor attn_scores_cpu(const at::Tensor& q_in, const at::Tensor& k_in,
                           const std::optional<at::Tensor>& lse_in,
                           const std::optional<at::Tensor>& key_start_in, int64_t key_start_int,
                           int64_t key_len, const std::optional<at::Tensor>& kv_start_in,
                           int64_t kv_start_int, const std::optional<at::Tensor>& q_pos_in,
                           double scale, bool causal, int64_t reduction) {
  check_attn_inputs(q_in, k_in, lse_in, key_start_in, key_start_int, key_len, kv_start_in, q_pos_in,
                    scale, reduction);
  TORCH_CHECK_VALUE(q_in.device().is_cpu(), "q must be a CPU tensor for the cpu backend, got ",
                    q_in.device());
  const int64_t B = q_in.size(0), H = q_in.size(1), Q = q_in.size(2), d = q_in.size(3);
  const int64_t Hkv = k_in.size(1), L = k_in.size(2);
  at::Tensor out = new_output({B, key_len}, q_in.options().dtype(at::kFloat));
  if (B == 0) return out;

  // Small tensors in the layout the loops want; k keeps its strides (a KV-cache view) unless its
  // last dimension is strided.
  const at::Tensor q = q_in.to(at::kFloat).contiguous();
  const at::Tensor k = (k_in.stride(3) == 1 || d == 1) ? k_in : k_in.contiguous();
  const auto lse = contiguous_opt(lse_in);
  const auto key_start = contiguous_opt(key_start_in);
  const auto kv_start = contiguous_opt(kv_start_in);
  const auto q_pos = contiguous_opt(q_pos_in);

  Plan p{};
  p.B = B, p.H = H, p.Q = Q, p.d = d, p.Hkv = Hkv, p.L = L, p.g = H / Hkv, p.R = p.g * Q;
  p.key_len = key_len;
  p.q = q.data_ptr<float>();
  p.lse = lse ? lse->data_ptr<float>() : nullptr;
  p.key_start = key_start ? key_start->data_ptr<int64_t>() : nullptr;
  p.key_start_int = key_start_int;
  p.kv_start = kv_start ? kv_start->data_ptr<int64_t>() : nullptr;
  p.kv_start_int = kv_start_int;
  p.q_pos = q_pos ? q_pos->data_ptr<int64_t>() : nullptr;
  p.causal = causal;
  p.scale = static_cast<float>(scale);
  p.sk0 = k.stride(0), p.sk1 = k.stride(1), p.sk2 = k.stride(2);

  // Split the key range of each unit when there are too few units to keep the threads busy, as
  // long as the span buffer that the split needs stays small (it holds R x key_len per unit).
  // Below a few MiB of K the call runs on the calling thread: waking the pool costs more than it
  // saves, and much more when a pool thread is descheduled on a busy machine.
  const int64_t units = B * Hkv;
  const int64_t k_bytes = units * L * d * static_cast<int64_t>(k.element_size());
  const int64_t threads = k_bytes < (int64_t(4) << 20) ? 1 : at::get_num_threads();
  int64_t C = 1;
  if (threads > 1 && units < 4 * threads) {
    C = std::min((4 * threads + units - 1) / units, std::max<int64_t>(1, L / 128));
    if (!p.lse && units * p.R * key_len * 4 > (int64_t(16) << 20)) C = 1;
  }
  p.C = C;
  at::Tensor partial = at::zeros({units, key_len}, q.options());
  at::Tensor stats, span;
  if (C > 1 && !p.lse) {
    stats = at::empty({units, C, p.R, 2}, q.options());
    span = at::empty({units, p.R, key_len}, q.options());
    p.stats = stats.data_ptr<float>();
    p.span = span.data_ptr<float>();
  }
  p.partial = partial.data_ptr<float>();

  // Items are handed out one at a time (a shared counter) rather than in static ranges, so a
  // thread that is descheduled on a busy machine does not hold up the others. Each item writes
  // its own outputs: the result does not depend on which thread ran it.
  const int64_t items = units * C;
  std::atomic<int64_t> next{0};
  auto phase1 = [&](const auto* kp) {
    if (threads == 1) return attn_items(p, kp, 0, items);
    at::parallel_for(0, std::min(items, threads), 1, [&](int64_t, int64_t) {
      for (int64_t i = next.fetch_add(1); i < items; i = next.fetch_add(1)) attn_items(p, kp, i, i + 1);
    });
  };
  switch (k.scalar_type()) {  // the dtypes check_attn_inputs admits
    case at::kFloat: phase1(k.data_ptr<float>()); break;
    case at::kBFloat16: phase1(k.data_ptr<c10::BFloat16>()); break;
    default: phase1(k.data_ptr<c10::Half>()); break;
  }
  if (C > 1 && !p.lse) {  // a few units (that is why C > 1): forking costs more than it saves
    const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 16) / std::max<int64_t>(1, p.R * key_len));
    at::parallel_for(0, units, grain, [&](int64_t a, int64_t b) { attn_merge(p, a, b); });
  }

  // out[b, t]: the units of sample b in kv-head order; NaN outside [0, L).
  float* op = out.data_ptr<float>();
  const float* pp = p.partial;
  const float inv = reduction == kReduceMean ? 1.0f / static_cast<float>(H * Q) : 1.0f;
  at::parallel_for(0, B, threads == 1 ? B : std::max<int64_t>(1, 4096 / key_len), [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t ks = span_start(p, b);
      for (int64_t t = 0; t < key_len; ++t) {
        const int64_t j = ks + t;
        if (j < 0 || j >= L) {
          op[b * key_len + t] = std::numeric_limits<float>::quiet_NaN();
          continue;
        }
        float acc = 0.0f;
        for (int64_t h = 0; h < Hkv; ++h) acc += pp[(b * Hkv + h) * key_len + t];
        op[b * key_len + t] = reduction == kReduceMean ? acc * inv : acc;
      }
    }
  });
  return out;
}

}  // namespace epic
