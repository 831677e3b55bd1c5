// Batched subset / superset butterflies over the last dimension of size 2^n.
//
// Bit order: index S of the last dimension is a bitmask, bit i set = player i present.
//   subset_mobius  : out(S) = sum_{L subset S} (-1)^{|S|-|L|} x(L)   (Harsanyi / AND transform)
//   subset_zeta    : out(S) = sum_{L subset S} x(L)                    (its inverse)
//   superset_mobius: out(S) = sum_{L superset S} (-1)^{|L|-|S|} x(L)
//   superset_zeta  : out(S) = sum_{L superset S} x(L)
// Each is n passes of an in-place butterfly over a copy of the input: O(n 2^n) per row.
#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <cstdint>

namespace sftint {
namespace {

// kSuperset: the pair (lo, hi) = (S without bit, S with bit) updates lo from hi instead of hi from lo.
// kSign: +1 for zeta, -1 for Mobius.
template <typename scalar_t, bool kSuperset, int kSign>
inline void butterfly_row(scalar_t* __restrict__ x, int64_t size) {
  int64_t half = 1;
  if (size >= 8) {
    // The three lowest bits together on blocks of 8 held in registers: their strides (1, 2, 4) do not
    // vectorise, so one sweep replaces three.
    for (int64_t block = 0; block < size; block += 8) {
      scalar_t y[8];
      for (int64_t c = 0; c < 8; ++c) y[c] = x[block + c];
      for (int64_t h = 1; h < 8; h <<= 1) {
        for (int64_t c = 0; c < 8; ++c) {
          if (c & h) continue;
          if (kSuperset) {
            y[c] += kSign * y[c + h];
          } else {
            y[c + h] += kSign * y[c];
          }
        }
      }
      for (int64_t c = 0; c < 8; ++c) x[block + c] = y[c];
    }
    half = 8;
  }
  for (; half < size; half <<= 1) {
    for (int64_t block = 0; block < size; block += 2 * half) {
      scalar_t* __restrict__ lo = x + block;
      scalar_t* __restrict__ hi = x + block + half;
      if (kSuperset) {
#pragma omp simd
        for (int64_t k = 0; k < half; ++k) lo[k] += kSign * hi[k];
      } else {
#pragma omp simd
        for (int64_t k = 0; k < half; ++k) hi[k] += kSign * lo[k];
      }
    }
  }
}

// One pass (one bit) over one row, parallel over blocks; used when there are fewer rows than threads.
template <typename scalar_t, bool kSuperset, int kSign>
inline void butterfly_row_parallel(scalar_t* x, int64_t size) {
  for (int64_t half = 1; half < size; half <<= 1) {
    const int64_t pairs = size / 2;
    at::parallel_for(0, pairs, 1 << 14, [&](int64_t begin, int64_t end) {
      for (int64_t p = begin; p < end; ++p) {
        const int64_t low_bits = p & (half - 1);
        const int64_t i = ((p - low_bits) << 1) | low_bits;  // index with the bit clear
        if (kSuperset) {
          x[i] += kSign * x[i + half];
        } else {
          x[i + half] += kSign * x[i];
        }
      }
    });
  }
}

template <typename scalar_t, bool kSuperset, int kSign>
void butterfly_rows(scalar_t* data, int64_t rows, int64_t size) {
  const int64_t threads = at::get_num_threads();
  if (rows >= threads || size < (1 << 15)) {
    at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) butterfly_row<scalar_t, kSuperset, kSign>(data + r * size, size);
    });
  } else {
    for (int64_t r = 0; r < rows; ++r) butterfly_row_parallel<scalar_t, kSuperset, kSign>(data + r * size, size);
  }
}

void check_input(const at::Tensor& x, const char* op) {
  TORCH_CHECK(x.device().is_cpu(), "sftint::", op, ": expected a CPU tensor, got a tensor on ", x.device());
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble, "sftint::", op,
              ": expected dtype float32 or float64, got ", x.scalar_type());
  TORCH_CHECK(x.dim() >= 1, "sftint::", op, ": expected a tensor with at least 1 dimension (..., 2^n), got a 0-d tensor");
  const int64_t size = x.size(-1);
  TORCH_CHECK(size >= 1 && (size & (size - 1)) == 0, "sftint::", op,
              ": expected the last dimension to be a power of two 2^n (n = number of players), got ", size);
}

template <bool kSuperset, int kSign>
at::Tensor transform(const at::Tensor& x, const char* op) {
  check_input(x, op);
  at::Tensor out = x.contiguous().clone();
  const int64_t size = out.size(-1);
  const int64_t rows = size == 0 ? 0 : out.numel() / size;
  AT_DISPATCH_FLOATING_TYPES(out.scalar_type(), "sftint_butterfly", [&] {
    butterfly_rows<scalar_t, kSuperset, kSign>(out.data_ptr<scalar_t>(), rows, size);
  });
  return out;
}

at::Tensor subset_mobius(const at::Tensor& x) { return transform<false, -1>(x, "subset_mobius"); }
at::Tensor subset_zeta(const at::Tensor& x) { return transform<false, 1>(x, "subset_zeta"); }
at::Tensor superset_mobius(const at::Tensor& x) { return transform<true, -1>(x, "superset_mobius"); }
at::Tensor superset_zeta(const at::Tensor& x) { return transform<true, 1>(x, "superset_zeta"); }

}  // namespace

TORCH_LIBRARY(sftint, m) {
  m.def("subset_mobius(Tensor x) -> Tensor");
  m.def("subset_zeta(Tensor x) -> Tensor");
  m.def("superset_mobius(Tensor x) -> Tensor");
  m.def("superset_zeta(Tensor x) -> Tensor");
}

TORCH_LIBRARY_IMPL(sftint, CPU, m) {
  m.impl("subset_mobius", &subset_mobius);
  m.impl("subset_zeta", &subset_zeta);
  m.impl("superset_mobius", &superset_mobius);
  m.impl("superset_zeta", &superset_zeta);
}

}  // namespace sftint

// A Python module named sftint_fast._C so that `import sftint_fast._C` loads the library (and its ops).
extern "C" {
#include <Python.h>
static struct PyModuleDef sftint_module = {PyModuleDef_HEAD_INIT, "_C", "sftint_fast C++ ops (torch.ops.sftint)", -1, nullptr};
PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&sftint_module); }
}
