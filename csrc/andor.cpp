// Fused steps of the AND-OR sparsifier's reference optimiser (METHOD.md section 3), for CPU tensors.
//
// One call runs `lrs.numel()` SGD steps (momentum, q clamped to +-bound after each step) on every row of
// v (B, 2^n), in place on p, q and the momentum buffers, and returns the objective before each step
// (steps, B). Rows go in groups of 8, interleaved so that every butterfly pass vectorises across the
// group; a group's scratch (7 buffers of 8·2^n values) stays in cache for the whole call, parallel over groups.
// It reproduces sftint_fast.interactions.andor._sgd (the torch loop) step for step.
#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/MemoryOverlap.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <algorithm>
#include <cstdint>
#include <utility>
#include <vector>

namespace sftint {
namespace {

template <typename T>
inline T sign_of(T x) { return static_cast<T>((x > 0) - (x < 0)); }

// kLanes rows are processed together, interleaved: value s of lane j sits at x[s * kLanes + j]. Every
// butterfly pass then works on contiguous runs of at least kLanes values, so all n bits vectorise, including
// the short strides that would not on a single row.
constexpr int64_t kLanes = 8;

// subset Mobius (kSuperset=false) or superset Mobius (kSuperset=true) of every lane, in place.
template <typename T, bool kSuperset>
inline void mobius_lanes(T* __restrict__ x, int64_t size) {
  for (int64_t half = 1; half < size; half <<= 1) {
    const int64_t run = half * kLanes;
    for (int64_t block = 0; block < size; block += 2 * half) {
      T* __restrict__ lo = x + block * kLanes;
      T* __restrict__ hi = lo + run;
      if (kSuperset) {
#pragma omp simd
        for (int64_t k = 0; k < run; ++k) lo[k] -= hi[k];
      } else {
#pragma omp simd
        for (int64_t k = 0; k < run; ++k) hi[k] -= lo[k];
      }
    }
  }
}

template <typename T>
void sgd_group(const T* v, T* p, T* q, T* buf_p, T* buf_q, const T* bound, const double* lrs, T* objective,
               int64_t rows, int64_t first, int64_t size, int64_t steps, T momentum) {
  const int64_t lanes = std::min(kLanes, rows - first);  // the last group may be partial: zero lanes pad it
  const int64_t total = size * kLanes;
  std::vector<T> V(total, 0), P(total, 0), Q(total, 0), BP(total, 0), BQ(total, 0), A(total), B(total);
  T bnd[kLanes] = {0}, obj[kLanes], or_empty[kLanes];
  for (int64_t j = 0; j < lanes; ++j) {
    const int64_t base = (first + j) * size;
    bnd[j] = bound[first + j];
    for (int64_t s = 0; s < size; ++s) {
      V[s * kLanes + j] = v[base + s];
      P[s * kLanes + j] = p[base + s];
      Q[s * kLanes + j] = q[base + s];
      BP[s * kLanes + j] = buf_p[base + s];
      BQ[s * kLanes + j] = buf_q[base + s];
    }
  }
  T* __restrict__ a = A.data();
  T* __restrict__ b = B.data();
  const int64_t last = (size - 1) * kLanes;
  for (int64_t step = 0; step < steps; ++step) {
#pragma omp simd
    for (int64_t i = 0; i < total; ++i) {
      const T half = (V[i] + Q[i]) * T(0.5);
      a[i] = half + P[i];  // v_and
      b[i] = half - P[i];  // v_or
    }
    for (int64_t j = 0; j < kLanes; ++j) or_empty[j] = b[j];
    mobius_lanes<T, false>(a, size);  // I_and
    mobius_lanes<T, true>(b, size);   // u, with I_or(S) = -u(N\S) for S != empty
    for (int64_t j = 0; j < kLanes; ++j) obj[j] = 0;
    for (int64_t s = 0; s < size; ++s) {
#pragma omp simd
      for (int64_t j = 0; j < kLanes; ++j) obj[j] += std::abs(a[s * kLanes + j]) + std::abs(b[s * kLanes + j]);
    }
    for (int64_t j = 0; j < lanes; ++j) {
      objective[step * rows + first + j] = obj[j] + std::abs(or_empty[j]) - std::abs(b[last + j]);
    }
#pragma omp simd
    for (int64_t i = 0; i < total; ++i) {
      a[i] = sign_of(a[i]);
      b[i] = sign_of(b[i]);
    }
    for (int64_t j = 0; j < kLanes; ++j) b[last + j] = 0;
    // adjoints: subset Mobius <-> superset Mobius
    mobius_lanes<T, true>(a, size);   // grad wrt v_and
    mobius_lanes<T, false>(b, size);  // grad wrt v_or
    for (int64_t j = 0; j < kLanes; ++j) b[j] += sign_of(or_empty[j]);
    const T lr = static_cast<T>(lrs[step]);
    for (int64_t s = 0; s < size; ++s) {
#pragma omp simd
      for (int64_t j = 0; j < kLanes; ++j) {
        const int64_t i = s * kLanes + j;
        BP[i] = BP[i] * momentum + a[i] - b[i];
        BQ[i] = BQ[i] * momentum + (a[i] + b[i]) * T(0.5);
        P[i] -= lr * BP[i];
        const T qs = Q[i] - lr * BQ[i];
        Q[i] = std::max(std::min(qs, bnd[j]), -bnd[j]);
      }
    }
  }
  for (int64_t j = 0; j < lanes; ++j) {
    const int64_t base = (first + j) * size;
    for (int64_t s = 0; s < size; ++s) {
      p[base + s] = P[s * kLanes + j];
      q[base + s] = Q[s * kLanes + j];
      buf_p[base + s] = BP[s * kLanes + j];
      buf_q[base + s] = BQ[s * kLanes + j];
    }
  }
}

template <typename T>
void sgd_rows(const T* v, T* p, T* q, T* buf_p, T* buf_q, const T* bound, const double* lrs, T* objective,
              int64_t rows, int64_t size, int64_t steps, T momentum) {
  const int64_t groups = (rows + kLanes - 1) / kLanes;
  at::parallel_for(0, groups, 1, [&](int64_t begin, int64_t end) {
    for (int64_t g = begin; g < end; ++g) {
      sgd_group<T>(v, p, q, buf_p, buf_q, bound, lrs, objective, rows, g * kLanes, size, steps, momentum);
    }
  });
}

// Whether a and b are known to share memory (Full or Partial; TooHard, for layouts the check cannot decide, passes).
bool overlaps(const at::Tensor& a, const at::Tensor& b) {
  const at::MemOverlapStatus status = at::get_overlap_status(a, b);
  return status == at::MemOverlapStatus::Full || status == at::MemOverlapStatus::Partial;
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
  // p, q, buf_p, buf_q are each written in place from a private copy: two sharing memory would silently end up
  // holding whichever was written last.
  const std::pair<const char*, const at::Tensor*> state[] = {
      {"p", &p}, {"q", &q}, {"buf_p", &buf_p}, {"buf_q", &buf_q}};
  for (int i = 1; i < 4; ++i) {
    for (int j = 0; j < i; ++j) {
      TORCH_CHECK(!overlaps(*state[i].second, *state[j].second),
                  "sftint::andor_sgd_: expected ", state[i].first, " not to share memory with ", state[j].first,
                  " (both are written in place), got two views of one storage");
    }
  }
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
