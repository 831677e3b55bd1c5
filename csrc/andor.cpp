// Fused steps of the AND-OR sparsifier's reference optimiser (METHOD.md section 3), for CPU tensors.
//
// One call runs `lrs.numel()` SGD steps (momentum, q clamped to +-bound after each step) on every row of
// v (B, 2^n), in place on p, q and the momentum buffers, and returns the objective before each step
// (steps, B). Per row, all scratch lives in two buffers of 2^n values that stay in cache, so the whole
// step -- four butterflies and the updates -- runs without leaving L1/L2, parallel over rows.
// It reproduces sftint_fast.interactions.andor._sgd (the torch loop) step for step.
#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <cstdint>
#include <vector>

namespace sftint {
namespace {

template <typename T>
inline T sign_of(T x) { return static_cast<T>((x > 0) - (x < 0)); }

// subset Mobius (kSuperset=false) or superset Mobius (kSuperset=true), in place. The three lowest bits are
// done together on blocks of 8 (short strides do not vectorise); the higher bits are wide, vectorised passes.
template <typename T, bool kSuperset>
inline void mobius(T* __restrict__ x, int64_t size) {
  int64_t half = 1;
  if (size >= 8) {
    for (int64_t block = 0; block < size; block += 8) {
      T* __restrict__ y = x + block;
      for (int64_t h = 1; h < 8; h <<= 1) {
        for (int64_t i = 0; i < 8; ++i) {
          if (i & h) continue;
          if (kSuperset) {
            y[i] -= y[i + h];
          } else {
            y[i + h] -= y[i];
          }
        }
      }
    }
    half = 8;
  }
  for (; half < size; half <<= 1) {
    for (int64_t block = 0; block < size; block += 2 * half) {
      T* __restrict__ lo = x + block;
      T* __restrict__ hi = x + block + half;
      if (kSuperset) {
#pragma omp simd
        for (int64_t k = 0; k < half; ++k) lo[k] -= hi[k];
      } else {
#pragma omp simd
        for (int64_t k = 0; k < half; ++k) hi[k] -= lo[k];
      }
    }
  }
}

template <typename T>
void sgd_rows(const T* v, T* p, T* q, T* buf_p, T* buf_q, const T* bound, const double* lrs, T* objective,
              int64_t rows, int64_t size, int64_t steps, T momentum) {
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> a(size), b(size);
    for (int64_t r = begin; r < end; ++r) {
      const T* vr = v + r * size;
      T* pr = p + r * size;
      T* qr = q + r * size;
      T* bp = buf_p + r * size;
      T* bq = buf_q + r * size;
      const T bnd = bound[r];
      for (int64_t step = 0; step < steps; ++step) {
        for (int64_t s = 0; s < size; ++s) {
          const T half = (vr[s] + qr[s]) * T(0.5);
          a[s] = half + pr[s];  // v_and
          b[s] = half - pr[s];  // v_or
        }
        const T or_empty = b[0];
        mobius<T, false>(a.data(), size);  // I_and
        mobius<T, true>(b.data(), size);   // u, with I_or(S) = -u(N\S) for S != empty
        T obj = 0;
        const T* ap = a.data();
        const T* bp_ = b.data();
#pragma omp simd reduction(+ : obj)
        for (int64_t s = 0; s < size; ++s) obj += std::abs(ap[s]) + std::abs(bp_[s]);
        obj += std::abs(or_empty) - std::abs(b[size - 1]);
        objective[step * rows + r] = obj;
        for (int64_t s = 0; s < size; ++s) {
          a[s] = sign_of(a[s]);
          b[s] = sign_of(b[s]);
        }
        b[size - 1] = 0;
        // adjoints: subset Mobius <-> superset Mobius
        mobius<T, true>(a.data(), size);   // grad wrt v_and
        mobius<T, false>(b.data(), size);  // grad wrt v_or
        b[0] += sign_of(or_empty);
        const T lr = static_cast<T>(lrs[step]);
        for (int64_t s = 0; s < size; ++s) {
          bp[s] = bp[s] * momentum + a[s] - b[s];
          bq[s] = bq[s] * momentum + (a[s] + b[s]) * T(0.5);
          pr[s] -= lr * bp[s];
          const T qs = qr[s] - lr * bq[s];
          qr[s] = std::max(std::min(qs, bnd), -bnd);
        }
      }
    }
  });
}

void check_same(const at::Tensor& t, const at::Tensor& v, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == v.scalar_type() && t.sizes() == v.sizes() && t.is_contiguous(),
              "sftint::andor_sgd_: expected ", name, " to be a contiguous CPU tensor of dtype ", v.scalar_type(),
              " and shape ", v.sizes(), ", got ", t.scalar_type(), " ", t.sizes(), " on ", t.device(),
              t.is_contiguous() ? "" : " (not contiguous)");
}

at::Tensor andor_sgd_(const at::Tensor& v, at::Tensor& p, at::Tensor& q, at::Tensor& buf_p, at::Tensor& buf_q,
                      const at::Tensor& bound, const at::Tensor& lrs, double momentum) {
  TORCH_CHECK(v.device().is_cpu(), "sftint::andor_sgd_: expected v on the CPU, got ", v.device());
  TORCH_CHECK(v.scalar_type() == at::kFloat || v.scalar_type() == at::kDouble,
              "sftint::andor_sgd_: expected v of dtype float32 or float64, got ", v.scalar_type());
  TORCH_CHECK(v.dim() == 2 && v.is_contiguous(), "sftint::andor_sgd_: expected v contiguous of shape (B, 2^n), got ",
              v.sizes());
  const int64_t size = v.size(1);
  TORCH_CHECK(size >= 1 && (size & (size - 1)) == 0,
              "sftint::andor_sgd_: expected the last dimension of v to be 2^n, got ", size);
  check_same(p, v, "p");
  check_same(q, v, "q");
  check_same(buf_p, v, "buf_p");
  check_same(buf_q, v, "buf_q");
  TORCH_CHECK(bound.device().is_cpu() && bound.scalar_type() == v.scalar_type() && bound.numel() == v.size(0) &&
                  bound.is_contiguous(),
              "sftint::andor_sgd_: expected bound contiguous with one value per row (", v.size(0), ") of dtype ",
              v.scalar_type(), ", got ", bound.sizes(), " ", bound.scalar_type());
  TORCH_CHECK(lrs.device().is_cpu() && lrs.scalar_type() == at::kDouble && lrs.dim() == 1 && lrs.is_contiguous(),
              "sftint::andor_sgd_: expected lrs a contiguous 1-D float64 CPU tensor, got ", lrs.sizes(), " ",
              lrs.scalar_type());
  const int64_t rows = v.size(0);
  const int64_t steps = lrs.numel();
  at::Tensor objective = at::empty({steps, rows}, v.options());
  AT_DISPATCH_FLOATING_TYPES(v.scalar_type(), "sftint_andor_sgd", [&] {
    sgd_rows<scalar_t>(v.data_ptr<scalar_t>(), p.data_ptr<scalar_t>(), q.data_ptr<scalar_t>(),
                       buf_p.data_ptr<scalar_t>(), buf_q.data_ptr<scalar_t>(), bound.data_ptr<scalar_t>(),
                       lrs.data_ptr<double>(), objective.data_ptr<scalar_t>(), rows, size, steps,
                       static_cast<scalar_t>(momentum));
  });
  return objective;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(sftint, m) {
  m.def("andor_sgd_(Tensor v, Tensor(a!) p, Tensor(b!) q, Tensor(c!) buf_p, Tensor(d!) buf_q, Tensor bound, "
        "Tensor lrs, float momentum) -> Tensor");
}

TORCH_LIBRARY_IMPL(sftint, CPU, m) { m.impl("andor_sgd_", &andor_sgd_); }

}  // namespace sftint
