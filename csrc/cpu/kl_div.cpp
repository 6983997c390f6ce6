// CPU kernel of the teacher-student KL divergence: loss and student gradient in one call.
//
// Per row (one OpenMP task each), with a = student / tau and b = teacher / tau:
//   pass 1: ma = max a, mb = max b
//   pass 2: ea = exp(a - ma), eb = exp(b - mb) into an fp32 scratch row (stays in L2), their
//           sums za, zb, and S = sum eb ((b - mb) - (a - ma))   (forward KL; mirrored for reverse)
//           KL(p_t || p_s) = S / zb + log za - log zb   (S is built from shifted logits)
//   pass 3: grad = tau (ea / za - eb / zb) * scale, written in the logits dtype
// Shifting by the row maxima before subtracting keeps the loss accurate for logits of +-1e4.
// Entries whose target probability is 0 (logit -inf) contribute 0, never NaN. A row whose softmax
// is undefined on either side (a NaN or +inf logit, or every logit -inf) gives loss NaN and an
// all-NaN gradient row: its exponential sums come out NaN (exp of NaN, or of -inf - -inf), or 0.
// The hot passes use GCC vector extensions (8 fp32 lanes, a polynomial exp) and are cloned for
// AVX2 and picked at load time (target_clones), so the same binary runs on any x86-64.
#include <ATen/Parallel.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "epic/checks.h"
#include "epic/ops.h"
#include "vec8.h"

namespace epic {

namespace {

using namespace cpu::vec8;  // v8f, splat, exp8, exp1, load8, hmax (force-inlined: see vec8.h)
constexpr int64_t kBlock = 256;  // lane partial sums are folded into double every kBlock entries

EPIC_VEC_INLINE double hsum64(v8f v) {  // in double, unlike vec8's float hsum
  double s = 0;
  for (int j = 0; j < kLanes; ++j) s += v[j];
  return s;
}

// Both softmax sums of a row are finite and positive (each is >= 1 when defined: the maximum's
// own term). NaN fails every comparison.
EPIC_VEC_INLINE bool row_defined(double za, double zb) {
  constexpr double kInf = std::numeric_limits<double>::infinity();
  return za > 0 && zb > 0 && za < kInf && zb < kInf;
}

// The D3 policy for an undefined row: NaN loss, every gradient entry NaN.
template <typename T>
EPIC_VEC_INLINE double undefined_row(T* g, int64_t V) {
  if (g != nullptr) std::fill(g, g + V, static_cast<T>(std::numeric_limits<float>::quiet_NaN()));
  return std::numeric_limits<double>::quiet_NaN();
}

// One row, fp32 math. s, t: logits (unit stride); ea, eb: fp32 scratch of V; g: gradient row or
// nullptr. Pass 1: row maxima. Pass 2: ea = exp(a - ma), eb = exp(b - mb), their sums and
// S = sum w d with w the target's weight and d the log-ratio of shifted logits; lane sums are
// folded into double every kBlock entries so long rows sum as accurately as PyTorch's.
// Pass 3: the gradient from the stored exponentials.
template <typename T, bool kReverse>
EPIC_VEC_INLINE double kl_row(const T* s, const T* t, int64_t V, float inv_tau,
                              float tau, float scale, float* ea, float* eb, T* g) {
  const float neg_inf = -std::numeric_limits<float>::infinity();
  const int64_t Vl = V - V % kLanes;
  v8f la = splat(neg_inf), lb = la;
  for (int64_t v = 0; v < Vl; v += kLanes) {
    const v8f a = load8(s + v) * inv_tau, b = load8(t + v) * inv_tau;
    la = a > la ? a : la;
    lb = b > lb ? b : lb;
  }
  float ma = hmax(la), mb = hmax(lb);
  for (int64_t v = Vl; v < V; ++v) {
    ma = std::max(ma, static_cast<float>(s[v]) * inv_tau);
    mb = std::max(mb, static_cast<float>(t[v]) * inv_tau);
  }

  double za = 0, zb = 0, S = 0;
  for (int64_t v0 = 0; v0 < Vl; v0 += kBlock) {
    const int64_t v1 = std::min(Vl, v0 + kBlock);
    v8f pza = splat(0.0f), pzb = pza, pS = pza;
    for (int64_t v = v0; v < v1; v += kLanes) {
      const v8f xa = load8(s + v) * inv_tau - ma;  // <= 0, -inf for a -inf logit
      const v8f xb = load8(t + v) * inv_tau - mb;
      const v8f pa = exp8(xa), pb = exp8(xb);
      std::memcpy(ea + v, &pa, sizeof(pa));
      std::memcpy(eb + v, &pb, sizeof(pb));
      pza += pa;
      pzb += pb;
      const v8f w = kReverse ? pa : pb;
      const v8f d = kReverse ? (xa - xb) : (xb - xa);
      pS += w > 0.0f ? w * d : splat(0.0f);  // no mass, no term (avoids 0 * inf)
    }
    za += hsum64(pza), zb += hsum64(pzb), S += hsum64(pS);
  }
  for (int64_t v = Vl; v < V; ++v) {
    const float xa = static_cast<float>(s[v]) * inv_tau - ma;
    const float xb = static_cast<float>(t[v]) * inv_tau - mb;
    const float pa = exp1(xa), pb = exp1(xb);
    ea[v] = pa, eb[v] = pb;
    za += pa, zb += pb;
    const float w = kReverse ? pa : pb, d = kReverse ? (xa - xb) : (xb - xa);
    S += w > 0 ? w * d : 0.0f;
  }
  if (!row_defined(za, zb)) return undefined_row(g, V);
  const double log_za = std::log(za), log_zb = std::log(zb);
  const double kl = kReverse ? S / za + log_zb - log_za : S / zb + log_za - log_zb;
  if (g != nullptr) {
    const float ra = static_cast<float>(1 / za), rb = static_cast<float>(1 / zb), c = tau * scale;
    if (!kReverse) {
      for (int64_t v = 0; v < V; ++v) g[v] = static_cast<T>(c * (ea[v] * ra - eb[v] * rb));
    } else {
      // d/da KL(p_s || p_t) = p_s (log p_s - log p_t - KL), the log-ratio from shifted logits.
      const float shift = static_cast<float>(static_cast<double>(mb - ma) + log_zb - log_za - kl);
      for (int64_t v = 0; v < V; ++v) {
        const float p = ea[v] * ra;
        const float lr = (static_cast<float>(s[v]) * inv_tau - static_cast<float>(t[v]) * inv_tau) + shift;
        g[v] = static_cast<T>(p > 0 ? c * p * lr : 0.0f);
      }
    }
  }
  return kl * static_cast<double>(tau) * static_cast<double>(tau);
}

// fp64 logits (gradcheck, tests): plain scalar code with std::exp.
double kl_row_f64(const double* s, const double* t, int64_t V, double inv_tau, double tau,
                  bool reverse, double scale, double* g) {
  double ma = -std::numeric_limits<double>::infinity(), mb = ma;
  for (int64_t v = 0; v < V; ++v) ma = std::max(ma, s[v] * inv_tau), mb = std::max(mb, t[v] * inv_tau);
  double za = 0, zb = 0, S = 0;
  for (int64_t v = 0; v < V; ++v) {
    const double xa = s[v] * inv_tau - ma, xb = t[v] * inv_tau - mb;
    const double pa = std::exp(xa), pb = std::exp(xb);
    za += pa, zb += pb;
    const double w = reverse ? pa : pb, d = reverse ? xa - xb : xb - xa;
    S += w > 0 ? w * d : 0.0;
  }
  if (!row_defined(za, zb)) return undefined_row(g, V);
  const double lza = std::log(za), lzb = std::log(zb);
  const double kl = reverse ? S / za + lzb - lza : S / zb + lza - lzb;
  if (g != nullptr) {
    for (int64_t v = 0; v < V; ++v) {
      const double xa = s[v] * inv_tau - ma, xb = t[v] * inv_tau - mb;
      const double pa = std::exp(xa) / za, pb = std::exp(xb) / zb;
      g[v] = tau * scale * (reverse ? (pa > 0 ? pa * ((xa - lza) - (xb - lzb) - kl) : 0.0) : pa - pb);
    }
  }
  return kl * tau * tau;
}

#define EPIC_KL_ROW_CLONE(NAME, T)                                                          \
  __attribute__((target_clones("avx2", "default"))) double NAME(                               \
      const T* s, const T* t, int64_t V, float inv_tau, float tau, bool reverse, float scale,  \
      float* ea, float* eb, T* g) {                                                            \
    return reverse ? kl_row<T, true>(s, t, V, inv_tau, tau, scale, ea, eb, g)                  \
                   : kl_row<T, false>(s, t, V, inv_tau, tau, scale, ea, eb, g);                \
  }
EPIC_KL_ROW_CLONE(kl_row_f32, float)
EPIC_KL_ROW_CLONE(kl_row_bf16, c10::BFloat16)
EPIC_KL_ROW_CLONE(kl_row_f16, c10::Half)
#undef EPIC_KL_ROW_CLONE

inline double kl_row_any(const float* s, const float* t, int64_t V, float it, float tau, bool r,
                         float sc, float* ea, float* eb, float* g) {
  return kl_row_f32(s, t, V, it, tau, r, sc, ea, eb, g);
}
inline double kl_row_any(const c10::BFloat16* s, const c10::BFloat16* t, int64_t V, float it,
                         float tau, bool r, float sc, float* ea, float* eb, c10::BFloat16* g) {
  return kl_row_bf16(s, t, V, it, tau, r, sc, ea, eb, g);
}
inline double kl_row_any(const c10::Half* s, const c10::Half* t, int64_t V, float it, float tau,
                         bool r, float sc, float* ea, float* eb, c10::Half* g) {
  return kl_row_f16(s, t, V, it, tau, r, sc, ea, eb, g);
}
inline double kl_row_any(const double* s, const double* t, int64_t V, double it, double tau,
                         bool r, double sc, double*, double*, double* g) {
  return kl_row_f64(s, t, V, it, tau, r, sc, g);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> kl_div_cpu(const at::Tensor& student_in,
                                              const at::Tensor& teacher_in,
                                              const std::optional<at::Tensor>& row_mask,
                                              double temperature, int64_t reduction, bool reverse,
                                              bool compute_grad, bool inplace) {
  check_kl_inputs(student_in, teacher_in, row_mask, temperature, reduction, inplace);
  const int64_t T = student_in.size(0), V = student_in.size(1);
  const at::Tensor student = unit_inner_stride(student_in);
  const at::Tensor teacher = unit_inner_stride(teacher_in);

  std::vector<uint8_t> keep(T, 1);
  int64_t rows = T;
  if (row_mask.has_value()) {
    const at::Tensor m = row_mask->contiguous();
    const bool* mp = m.data_ptr<bool>();
    rows = 0;
    for (int64_t i = 0; i < T; ++i) rows += (keep[i] = mp[i] ? 1 : 0);
  }
  const double norm = reduction == kReduceBatchMean ? double(rows)
                      : reduction == kReduceMean     ? double(rows) * double(V)
                                                     : 1.0;
  // The stored gradient already carries 1 / normaliser; backward only scales by grad_output.
  const double row_scale = norm > 0 ? 1.0 / norm : 0.0;

  at::Tensor grad;
  if (compute_grad) grad = inplace ? student_in : new_output({T, V}, student.options());
  std::vector<double> losses(T, 0.0);  // V == 0: every row's KL is 0 (an empty sum)

  if (V > 0) AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, student.scalar_type(), "kl_div_cpu", [&] {
    using A = acc_of<scalar_t>;
    const scalar_t* sp = student.data_ptr<scalar_t>();
    const scalar_t* tp = teacher.data_ptr<scalar_t>();
    scalar_t* gp = compute_grad ? grad.data_ptr<scalar_t>() : nullptr;
    const int64_t ss = student.stride(0), ts = teacher.stride(0), gs = compute_grad ? grad.stride(0) : 0;
    const A tau = static_cast<A>(temperature), inv_tau = A(1) / tau;
    const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(V, 1));
    at::parallel_for(0, T, grain, [&](int64_t r0, int64_t r1) {
      std::vector<A> ea(V), eb(V);
      for (int64_t r = r0; r < r1; ++r) {
        scalar_t* g = gp ? gp + r * gs : nullptr;
        if (!keep[r]) {
          if (g) std::fill(g, g + V, scalar_t(0));
          continue;
        }
        losses[r] = kl_row_any(sp + r * ss, tp + r * ts, V, inv_tau, tau, reverse,
                               static_cast<A>(row_scale), ea.data(), eb.data(), g);
      }
    });
  });

  at::Tensor loss;
  if (reduction == kReduceNone) {
    loss = new_output({T}, student.options().dtype(at::kFloat));
    float* lp = loss.data_ptr<float>();
    for (int64_t r = 0; r < T; ++r) lp[r] = static_cast<float>(losses[r]);
  } else {
    double total = 0;  // fixed order: deterministic
    for (int64_t r = 0; r < T; ++r) total += losses[r];
    loss = at::scalar_tensor(norm > 0 ? total / norm : 0.0, student.options().dtype(at::kFloat));
  }
  if (!compute_grad) grad = at::empty({0}, student.options());
  return {loss, grad};
}

}  // namespace epic
