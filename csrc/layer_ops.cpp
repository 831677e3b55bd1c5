// Fused elementwise ops of the trie's layer loop on the CPU (float32), and the log-odds of scored logits.
//
// HF's modules run these as chains of ATen ops, each reading and writing whole activations (RMSNorm: pow, mean,
// add, rsqrt, mul, mul; RoPE: five ops per tensor; the gate: silu then mul), each into a fresh allocation; the value
// of a game reads [B, m, V] logits five times (isfinite, scatter, logsumexp's max, sub, exp). Here each is one pass
// per row, in cache, parallel over rows, and RoPE and the gate write into their input (a projection's fresh output).
//
//   rms_norm(x [R, H], w [H], eps, gemma) : HF's RMSNorm: w * (x * rsqrt(mean(x^2) + eps)) (Llama, Qwen2, Mistral),
//                                           or (x * rsqrt(mean(x^2) + eps)) * (1 + w) (Gemma-3).
//   rope_(x [N, Hh, D], cos [N, D], sin [N, D]) : x <- x * cos + rotate_half(x) * sin (apply_rotary_pos_emb).
//   silu_mul_(gate, up)                   : gate <- silu(gate) * up.
//   log_odds(logits [B, m, V], target [m] int64) -> (values [B], finite [B]):
//                                           sum_j logits[b, j, t_j] - logsumexp_{k != t_j} logits[b, j, k], and
//                                           whether every logit of row b is finite.
//
// float32 only (the CPU's evaluation dtype; reduced-precision casts would not vectorize here). Products are never
// contracted into FMAs (fp-contract=off), so RoPE rounds exactly as ATen does; what differs from HF is float32
// reduction order (RMSNorm's mean, the logsumexp) and the last bits of exp (Cephes' polynomial, which the compiler
// vectorizes; ATen uses SLEEF). no-trapping-math lets the vectorizer if-convert exp's clamps.
// SIMD: the loops are written for the auto-vectorizer; on x86-64 an AVX2+FMA build of each kernel is picked at
// run time when the CPU has them (no -march flag in the build), else the baseline (SSE2 / NEON) one.
#if defined(__clang__)
#pragma clang fp contract(off)
#elif defined(__GNUC__)
#pragma GCC optimize("fp-contract=off", "no-trapping-math")
#endif

#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/MemoryOverlap.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <tuple>
#include <utility>
#include <vector>

#if defined(__GNUC__)
#define SFTINT_INLINE __attribute__((always_inline)) inline
#else
#define SFTINT_INLINE inline
#endif

#if defined(__x86_64__) && defined(__GNUC__)
#define SFTINT_LAYER_AVX2 1
#define SFTINT_AVX2_TARGET __attribute__((target("avx2,fma")))
#else
#define SFTINT_LAYER_AVX2 0
#endif

namespace sftint {
namespace {

// Rows per task: enough work per task that the fork/join of at::parallel_for does not dominate.
constexpr int64_t kGrainValues = int64_t{1} << 16;

int64_t grain_rows(int64_t row_values) { return std::max<int64_t>(1, kGrainValues / std::max<int64_t>(1, row_values)); }

bool use_avx2() {
#if SFTINT_LAYER_AVX2
  static const bool has = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  }();
  return has;
#else
  return false;
#endif
}

// exp(x) for float32, Cephes' expf: x = k ln2 + r, |r| <= ln2 / 2, a degree-5 polynomial for e^r, 2^k from the
// exponent bits. Branch-free, so loops over it vectorize. Below -87.3 (e^x under the normal range) it is clamped:
// e^x comes out as 1.2e-38; above 88.37 it is inf, as the true e^x (>= 2.4e38) is or nearly is: a clamp there made
// silu(-1e38) = -1e38 / 2.4e38 = -0.42 instead of -0. NaN stays NaN.
SFTINT_INLINE float exp_f32(float x) {
  const float lo = -87.3365447505531f, hi = 88.3762626647949f;
  float xc = x < lo ? lo : x;
  xc = xc > hi ? hi : xc;
  const float safe = xc == xc ? xc : 0.0f;  // the exponent of a NaN is never converted to int
  // k = round(x / ln2) by the 1.5 * 2^23 trick (|x / ln2| < 2^22): exact, and no branch for the vectorizer
  const float k = (safe * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  const float r = (xc - k * 0.693359375f) - k * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * (r * r) + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(k) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return x > hi ? std::numeric_limits<float>::infinity() : p * scale;
}

// ---- RMSNorm ------------------------------------------------------------------------------------------------
template <bool kGemma>
SFTINT_INLINE void rms_norm_rows(const float* x, int64_t stride_x, const float* w, float* y, int64_t r0, int64_t r1,
                                 int64_t h, float eps) {
  for (int64_t r = r0; r < r1; ++r) {
    const float* xr = x + r * stride_x;
    float* yr = y + r * h;
    float ss = 0.0f;
#pragma omp simd reduction(+ : ss)
    for (int64_t i = 0; i < h; ++i) ss += xr[i] * xr[i];
    const float inv = 1.0f / std::sqrt(ss / static_cast<float>(h) + eps);
    if (kGemma) {
#pragma omp simd
      for (int64_t i = 0; i < h; ++i) yr[i] = (xr[i] * inv) * (1.0f + w[i]);
    } else {
#pragma omp simd
      for (int64_t i = 0; i < h; ++i) yr[i] = w[i] * (xr[i] * inv);
    }
  }
}

SFTINT_INLINE void rms_norm_rows_llama(const float* x, int64_t sx, const float* w, float* y, int64_t r0, int64_t r1,
                                       int64_t h, float eps) {
  rms_norm_rows<false>(x, sx, w, y, r0, r1, h, eps);
}

SFTINT_INLINE void rms_norm_rows_gemma(const float* x, int64_t sx, const float* w, float* y, int64_t r0, int64_t r1,
                                       int64_t h, float eps) {
  rms_norm_rows<true>(x, sx, w, y, r0, r1, h, eps);
}

// ---- RoPE (rotate half), in place ---------------------------------------------------------------------------
SFTINT_INLINE void rope_rows(float* x, int64_t sxt, int64_t sxh, const float* cos, int64_t sct, const float* sin,
                             int64_t sst, int64_t t0, int64_t t1, int64_t heads, int64_t dim) {
  const int64_t half = dim / 2;
  for (int64_t t = t0; t < t1; ++t) {
    const float* c = cos + t * sct;
    const float* s = sin + t * sst;
    for (int64_t hh = 0; hh < heads; ++hh) {
      float* xr = x + t * sxt + hh * sxh;
#pragma omp simd
      for (int64_t i = 0; i < half; ++i) {
        const float x1 = xr[i], x2 = xr[i + half];
        xr[i] = x1 * c[i] + (-x2) * s[i];
        xr[i + half] = x2 * c[i + half] + x1 * s[i + half];
      }
    }
  }
}

// ---- silu(gate) * up, into gate -----------------------------------------------------------------------------
SFTINT_INLINE void silu_mul_range(float* g, const float* u, int64_t i0, int64_t i1) {
#pragma omp simd
  for (int64_t i = i0; i < i1; ++i) g[i] = (g[i] / (1.0f + exp_f32(-g[i]))) * u[i];
}

// sum_{a <= k < b} exp(row[k] - mx): float32 partial sums over blocks, added in double, so the long [V] sum keeps
// float32 accuracy per term.
SFTINT_INLINE double sum_exp(const float* row, int64_t a, int64_t b, float mx) {
  constexpr int64_t kBlock = 512;
  double total = 0.0;
  for (int64_t b0 = a; b0 < b; b0 += kBlock) {
    const int64_t b1 = std::min(b, b0 + kBlock);
    float part = 0.0f;
#pragma omp simd reduction(+ : part)
    for (int64_t k = b0; k < b1; ++k) part += exp_f32(row[k] - mx);
    total += part;
  }
  return total;
}

// ---- log-odds of one [V] row --------------------------------------------------------------------------------
// Returns logit[t] - logsumexp_{k != t} logit[k]; `bad` accumulates x - x over the row (0 iff all are finite).
SFTINT_INLINE float log_odds_row(const float* row, int64_t vocab, int64_t t, float& bad) {
  float mx = -std::numeric_limits<float>::infinity();
  float nf = 0.0f;
#pragma omp simd reduction(max : mx) reduction(+ : nf)
  for (int64_t k = 0; k < t; ++k) {
    mx = row[k] > mx ? row[k] : mx;
    nf += row[k] - row[k];
  }
#pragma omp simd reduction(max : mx) reduction(+ : nf)
  for (int64_t k = t + 1; k < vocab; ++k) {
    mx = row[k] > mx ? row[k] : mx;
    nf += row[k] - row[k];
  }
  bad += nf + (row[t] - row[t]);
  if (!(mx > -std::numeric_limits<float>::infinity())) {  // no other token (V = 1), or all -inf / NaN
    return row[t] - mx;
  }
  const double total = sum_exp(row, 0, t, mx) + sum_exp(row, t + 1, vocab, mx);
  return row[t] - (mx + static_cast<float>(std::log(total)));
}

SFTINT_INLINE void log_odds_rows(const float* logits, const int64_t* target, float* values, bool* finite, int64_t b0,
                                 int64_t b1, int64_t m, int64_t vocab) {
  for (int64_t b = b0; b < b1; ++b) {
    float bad = 0.0f;
    float value = 0.0f;
    for (int64_t j = 0; j < m; ++j) value += log_odds_row(logits + (b * m + j) * vocab, vocab, target[j], bad);
    values[b] = value;
    finite[b] = bad == 0.0f;
  }
}

// `name##_any(...)`: the inline kernel `name` compiled for AVX2 + FMA when the CPU has them (x86-64), else for the
// baseline instruction set.
#if SFTINT_LAYER_AVX2
#define SFTINT_DISPATCHED(name, params, args)                   \
  void name##_generic params { name args; }                     \
  SFTINT_AVX2_TARGET void name##_avx2 params { name args; }     \
  void name##_any params {                                      \
    if (use_avx2()) name##_avx2 args; else name##_generic args; \
  }
#else
#define SFTINT_DISPATCHED(name, params, args) \
  void name##_any params { name args; }
#endif

SFTINT_DISPATCHED(rms_norm_rows_llama,
                  (const float* x, int64_t sx, const float* w, float* y, int64_t r0, int64_t r1, int64_t h, float eps),
                  (x, sx, w, y, r0, r1, h, eps))
SFTINT_DISPATCHED(rms_norm_rows_gemma,
                  (const float* x, int64_t sx, const float* w, float* y, int64_t r0, int64_t r1, int64_t h, float eps),
                  (x, sx, w, y, r0, r1, h, eps))
SFTINT_DISPATCHED(rope_rows,
                  (float* x, int64_t sxt, int64_t sxh, const float* c, int64_t sct, const float* s, int64_t sst,
                   int64_t t0, int64_t t1, int64_t heads, int64_t dim),
                  (x, sxt, sxh, c, sct, s, sst, t0, t1, heads, dim))
SFTINT_DISPATCHED(silu_mul_range, (float* g, const float* u, int64_t i0, int64_t i1), (g, u, i0, i1))
SFTINT_DISPATCHED(log_odds_rows,
                  (const float* l, const int64_t* t, float* v, bool* f, int64_t b0, int64_t b1, int64_t m, int64_t V),
                  (l, t, v, f, b0, b1, m, V))

// Whether a and b may share memory. ATen decides for dense tensors; for strided views (TooHard) two views of one
// storage count as sharing when the byte ranges they span intersect.
bool overlaps(const at::Tensor& a, const at::Tensor& b) {
  const at::MemOverlapStatus status = at::get_overlap_status(a, b);
  if (status != at::MemOverlapStatus::TooHard) {
    return status == at::MemOverlapStatus::Full || status == at::MemOverlapStatus::Partial;
  }
  if (!a.storage().is_alias_of(b.storage())) return false;
  const auto span = [](const at::Tensor& t) {
    int64_t last = 0;
    for (int64_t d = 0; d < t.dim(); ++d) last += (t.size(d) - 1) * t.stride(d);
    const char* begin = static_cast<const char*>(t.const_data_ptr());
    return std::make_pair(begin, begin + (last + 1) * static_cast<int64_t>(t.element_size()));
  };
  const auto [a0, a1] = span(a);
  const auto [b0, b1] = span(b);
  return a0 < b1 && b0 < a1;
}

// Whether two elements of x may share memory. ATen decides dense tensors and zero strides; for other strided views
// (TooHard), sorted by stride, every dimension must step past all the offsets of the ones below it (true of any
// slice or permutation of a dense tensor; an exotic non-overlapping as_strided layout is refused, not mis-written).
bool self_overlaps(const at::Tensor& x) {
  const at::MemOverlap status = at::has_internal_overlap(x);
  if (status != at::MemOverlap::TooHard) return status == at::MemOverlap::Yes;
  std::vector<std::pair<int64_t, int64_t>> dims;  // (stride, size) of the dimensions with more than one element
  for (int64_t d = 0; d < x.dim(); ++d) {
    if (x.size(d) > 1) dims.emplace_back(x.stride(d), x.size(d));
  }
  std::sort(dims.begin(), dims.end());
  int64_t extent = 1;  // 1 + the largest offset reached by the dimensions so far
  for (const auto& [stride, size] : dims) {
    if (stride < extent) return true;
    extent += stride * (size - 1);
  }
  return false;
}

void check_cpu_f32(const at::Tensor& t, const char* name, const char* op) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat, op, ": ", name,
              ": expected a float32 CPU tensor, got ", t.scalar_type(), " on ", t.device());
}

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps, bool gemma) {
  check_cpu_f32(x, "x", "rms_norm");
  check_cpu_f32(weight, "weight", "rms_norm");
  TORCH_CHECK(x.dim() >= 1, "rms_norm: x: expected at least one dimension, got a scalar");
  const int64_t h = x.size(-1);
  TORCH_CHECK(h >= 1, "rms_norm: x: expected a last dimension (hidden size) >= 1, got ", h, " (shape ", x.sizes(),
              ")");
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == h, "rms_norm: weight: expected shape (", h,
              ",) (x's last dimension), got ", weight.sizes());
  at::Tensor rows = x.reshape({-1, h});
  if (h > 1 && rows.stride(1) != 1) rows = rows.contiguous();
  const at::Tensor w = weight.contiguous();
  at::Tensor y = at::empty(rows.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));
  const int64_t n = rows.size(0), sx = rows.stride(0);
  if (n && h) {
    const float* xp = rows.const_data_ptr<float>();
    const float* wp = w.const_data_ptr<float>();
    float* yp = y.mutable_data_ptr<float>();
    const float e = static_cast<float>(eps);
    at::parallel_for(0, n, grain_rows(h), [&](int64_t r0, int64_t r1) {
      if (gemma) {
        rms_norm_rows_gemma_any(xp, sx, wp, yp, r0, r1, h, e);
      } else {
        rms_norm_rows_llama_any(xp, sx, wp, yp, r0, r1, h, e);
      }
    });
  }
  return y.view(x.sizes());
}

void rope_(at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
  check_cpu_f32(x, "x", "rope_");
  TORCH_CHECK(x.dim() == 3 && x.size(2) % 2 == 0 && (x.size(2) == 0 || x.stride(2) == 1),
              "rope_: x: expected shape [N, heads, D] with D even and unit stride over D, got ", x.sizes(),
              " with strides ", x.strides());
  TORCH_CHECK(!self_overlaps(x),
              "rope_: x: expected a tensor whose elements do not share memory (it is written in place), got shape ",
              x.sizes(), " with strides ", x.strides(), " (an expanded tensor?); pass x.contiguous()");
  for (const auto& [name, table] : {std::pair<const char*, const at::Tensor&>{"cos", cos}, {"sin", sin}}) {
    check_cpu_f32(table, name, "rope_");
    TORCH_CHECK(table.dim() == 2 && table.size(0) == x.size(0) && table.size(1) == x.size(2), "rope_: ", name,
                ": expected shape [", x.size(0), ", ", x.size(2), "], got ", table.sizes());
    TORCH_CHECK(!overlaps(x, table), "rope_: ", name,
                ": expected a tensor that does not share memory with x (x is written in place), got a view of x's "
                "storage; pass a clone");
  }
  const at::Tensor c = cos.stride(1) == 1 ? cos : cos.contiguous();
  const at::Tensor s = sin.stride(1) == 1 ? sin : sin.contiguous();
  const int64_t n = x.size(0), heads = x.size(1), dim = x.size(2);
  if (x.numel()) {
    float* xp = x.mutable_data_ptr<float>();
    const float* cp = c.const_data_ptr<float>();
    const float* sp = s.const_data_ptr<float>();
    const int64_t sxt = x.stride(0), sxh = x.stride(1), sct = c.stride(0), sst = s.stride(0);
    at::parallel_for(0, n, grain_rows(heads * dim), [&](int64_t t0, int64_t t1) {
      rope_rows_any(xp, sxt, sxh, cp, sct, sp, sst, t0, t1, heads, dim);
    });
  }
}

void silu_mul_(at::Tensor& gate, const at::Tensor& up) {
  check_cpu_f32(gate, "gate", "silu_mul_");
  check_cpu_f32(up, "up", "silu_mul_");
  TORCH_CHECK(gate.is_contiguous(), "silu_mul_: gate: expected a contiguous tensor, got strides ", gate.strides());
  TORCH_CHECK(up.sizes() == gate.sizes(), "silu_mul_: up: expected shape ", gate.sizes(), " (that of gate), got ",
              up.sizes());
  const at::Tensor u = up.contiguous();
  // up is read while gate is written: up being gate itself is fine (elementwise), a shifted view of it is not
  TORCH_CHECK(at::get_overlap_status(gate, u) != at::MemOverlapStatus::Partial,
              "silu_mul_: up: expected gate itself or a tensor not to share memory with gate (gate is written in ",
              "place), got a view that partly overlaps gate; pass a clone");
  const int64_t n = gate.numel();
  if (n) {
    float* gp = gate.mutable_data_ptr<float>();
    const float* up_ = u.const_data_ptr<float>();
    at::parallel_for(0, n, kGrainValues, [&](int64_t i0, int64_t i1) { silu_mul_range_any(gp, up_, i0, i1); });
  }
}

std::tuple<at::Tensor, at::Tensor> log_odds(const at::Tensor& logits, const at::Tensor& target) {
  check_cpu_f32(logits, "logits", "log_odds");
  TORCH_CHECK(logits.dim() == 3 && logits.size(2) > 0, "log_odds: logits: expected shape [B, m, V] with V > 0, got ",
              logits.sizes());
  const int64_t batch = logits.size(0), m = logits.size(1), vocab = logits.size(2);
  TORCH_CHECK(target.device().is_cpu() && target.scalar_type() == at::kLong && target.dim() == 1 &&
                  target.size(0) == m,
              "log_odds: target: expected int64 [", m, "] on the CPU, got ", target.scalar_type(), " ",
              target.sizes(), " on ", target.device());
  const at::Tensor t = target.contiguous();
  const int64_t* tp = t.const_data_ptr<int64_t>();
  for (int64_t j = 0; j < m; ++j) {
    TORCH_CHECK(tp[j] >= 0 && tp[j] < vocab, "log_odds: target[", j, "]: expected a token id in [0, ", vocab,
                "), got ", tp[j]);
  }
  const at::Tensor l = logits.contiguous();
  at::Tensor values = at::empty({batch}, logits.options());
  at::Tensor finite = at::empty({batch}, logits.options().dtype(at::kBool));
  if (batch) {
    const float* lp = l.const_data_ptr<float>();
    float* vp = values.mutable_data_ptr<float>();
    bool* fp = finite.mutable_data_ptr<bool>();
    at::parallel_for(0, batch, grain_rows(m * vocab), [&](int64_t b0, int64_t b1) {
      log_odds_rows_any(lp, tp, vp, fp, b0, b1, m, vocab);
    });
  }
  return {values, finite};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(sftint, m) {
  m.def("rms_norm(Tensor x, Tensor weight, float eps, bool gemma) -> Tensor");
  m.def("rope_(Tensor(a!) x, Tensor cos, Tensor sin) -> ()");
  m.def("silu_mul_(Tensor(a!) gate, Tensor up) -> ()");
  m.def("log_odds(Tensor logits, Tensor target) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(sftint, CPU, m) {
  m.impl("rms_norm", &rms_norm);
  m.impl("rope_", &rope_);
  m.impl("silu_mul_", &silu_mul_);
  m.impl("log_odds", &log_odds);
}

}  // namespace sftint
