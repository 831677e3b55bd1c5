// Batched subset / superset butterflies over the last dimension of size 2^n.
//
// Bit order: index S of the last dimension is a bitmask, bit i set = player i present.
//   subset_mobius  : out(S) = sum_{L subset S} (-1)^{|S|-|L|} x(L)   (Harsanyi / AND transform)
//   subset_zeta    : out(S) = sum_{L subset S} x(L)                    (its inverse)
//   superset_mobius: out(S) = sum_{L superset S} (-1)^{|L|-|S|} x(L)
//   superset_zeta  : out(S) = sum_{L superset S} x(L)
// Each is n butterfly passes, one per bit, O(n 2^n) per row. The passes are grouped so that a row is
// swept only ~n/3 times (rows are processed one at a time, so a row of up to 2^12 fp32 values stays in L1):
//   * the lowest log2(lanes) bits are butterflies between the lanes of one SIMD vector (shuffle + add);
//   * every higher bit b has a stride 2^b of at least one vector, and three of them at once are a radix-8
//     sweep: load the 8 vectors at offsets {0, h, 2h, ..., 7h}, run the three butterfly stages in registers,
//     store them back;
//   * the first sweep also does the in-vector bits and reads the input, writing the output, so there is no
//     separate copy.
// The bits are applied in the same order (0, 1, ..., n-1) as n plain passes, so the result is bitwise equal
// to the pass-by-pass butterfly (the torch fallback).
//
// SIMD: GCC/Clang vector extensions. On x86-64 the 256-bit (AVX2) kernels are compiled with a function-level
// target attribute and picked at run time when the CPU has AVX2, so the build needs no -march flag; the
// generic kernels use 128-bit vectors (SSE2 on x86-64, NEON on arm64). Other compilers get the scalar kernel.
#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <utility>

#if defined(__GNUC__)
#define SFTINT_ALWAYS_INLINE __attribute__((always_inline)) inline
#define SFTINT_VECTOR_EXT 1
#else
#define SFTINT_ALWAYS_INLINE inline
#define SFTINT_VECTOR_EXT 0
#endif

#if defined(__x86_64__) && defined(__GNUC__)
#define SFTINT_X86_AVX2 1
#else
#define SFTINT_X86_AVX2 0
#endif

#if defined(__GNUC__) && !defined(__clang__)
// The 256-bit vector helpers are always inlined into AVX2-target functions, so no vector ever crosses a call
// boundary: GCC's warning that their (never used) out-of-line ABI would differ without AVX is noise. (Vectors
// are passed by reference: for by-value parameters GCC adds a -Wpsabi note that this pragma does not silence.)
#pragma GCC diagnostic ignored "-Wpsabi"
#endif

namespace sftint {
namespace {

// Work goes to threads in tasks of at least this many values (rows, or radix groups of one long row): ~0.1 ms
// of work on one core, so that the fork/join (tens of microseconds on idle cores, up to a scheduler time slice,
// milliseconds, when the cores are oversubscribed) stays small beside a task. Fewer values run on the calling
// thread; e.g. 64 rows of 2^12 fp32 values (0.09 ms) are one task.
constexpr int64_t kGrainValues = int64_t{1} << 18;

// One value per "vector": the portable kernel, and the one for rows shorter than a SIMD vector.
template <typename T>
struct ScalarTraits {
  using Scalar = T;
  using V = T;
  static constexpr int kLogLanes = 0;
};

#if SFTINT_VECTOR_EXT
template <typename T, int kBytes>
struct VectorTraits {
  using Scalar = T;
  using Int = std::conditional_t<sizeof(T) == 4, int32_t, int64_t>;
  typedef T V __attribute__((vector_size(kBytes)));
  typedef Int VI __attribute__((vector_size(kBytes)));
  static constexpr int kLanes = kBytes / static_cast<int>(sizeof(T));
  static constexpr int kLogLanes = kLanes == 2 ? 1 : kLanes == 4 ? 2 : 3;
  static_assert(kLanes == 2 || kLanes == 4 || kLanes == 8, "2, 4 or 8 lanes");
};
template <typename T>
using GenericTraits = VectorTraits<T, 16>;
#else
template <typename T>
using GenericTraits = ScalarTraits<T>;
#endif

template <typename V, typename T>
SFTINT_ALWAYS_INLINE V load(const T* p) {
  V v;
  std::memcpy(&v, p, sizeof(V));
  return v;
}

template <typename V, typename T>
SFTINT_ALWAYS_INLINE void store(T* p, const V& v) {
  std::memcpy(p, &v, sizeof(V));
}

// One butterfly: the value with the bit clear is lo, with the bit set is hi.
template <bool kSuperset, int kSign, typename V>
SFTINT_ALWAYS_INLINE void butterfly(V& lo, V& hi) {
  if (kSuperset) {
    lo = kSign > 0 ? lo + hi : lo - hi;
  } else {
    hi = kSign > 0 ? hi + lo : hi - lo;
  }
}

#if SFTINT_VECTOR_EXT
// Lane c of the result is lane c ^ kH of y where lane c is updated (subset: bit kH set; superset: clear),
// otherwise lane c of fill.
template <class Tr, int kH, bool kSuperset, size_t... Is>
SFTINT_ALWAYS_INLINE typename Tr::V partner_or_fill(const typename Tr::V& y, const typename Tr::V& fill,
                                                    std::index_sequence<Is...>) {
#if defined(__clang__) || __GNUC__ >= 12
  return __builtin_shufflevector(
      y, fill, static_cast<int>((((Is & kH) != 0) != kSuperset) ? (Is ^ kH) : (Tr::kLanes + Is))...);
#else
  return __builtin_shuffle(y, fill, typename Tr::VI{static_cast<typename Tr::Int>(
                                        (((Is & kH) != 0) != kSuperset) ? (Is ^ kH) : (Tr::kLanes + Is))...});
#endif
}

// Butterflies of bit log2(kH) between the lanes of one vector: lane c is updated when it is the "hi" of its pair
// (subset: bit set) or the "lo" (superset: bit clear), from lane c ^ kH. One two-input shuffle (swap + blend)
// and one add: the other lanes get a neutral value, y + (-0.0) or y - (+0.0), which leaves every y unchanged,
// -0.0 included; no multiply by a 0/1 mask, so an inf in one lane cannot turn a neighbour into NaN.
template <class Tr, bool kSuperset, int kSign, int kH, size_t... Is>
SFTINT_ALWAYS_INLINE typename Tr::V lane_stage(const typename Tr::V& y, std::index_sequence<Is...> lanes) {
  using T = typename Tr::Scalar;
  const typename Tr::V fill = {((void)Is, kSign > 0 ? T(-0.0) : T(0.0))...};
  const typename Tr::V partner = partner_or_fill<Tr, kH, kSuperset>(y, fill, lanes);
  return kSign > 0 ? y + partner : y - partner;
}

// All in-vector bits (0 .. log2(lanes)-1), in increasing order.
template <class Tr, bool kSuperset, int kSign>
SFTINT_ALWAYS_INLINE void lane_stages(typename Tr::V& y) {
  const auto lanes = std::make_index_sequence<Tr::kLanes>{};
  y = lane_stage<Tr, kSuperset, kSign, 1>(y, lanes);
  if constexpr (Tr::kLanes >= 4) y = lane_stage<Tr, kSuperset, kSign, 2>(y, lanes);
  if constexpr (Tr::kLanes >= 8) y = lane_stage<Tr, kSuperset, kSign, 4>(y, lanes);
}
#endif

template <class Tr, bool kSuperset, int kSign>
SFTINT_ALWAYS_INLINE void in_vector_bits(typename Tr::V& y) {
#if SFTINT_VECTOR_EXT
  if constexpr (Tr::kLogLanes > 0) lane_stages<Tr, kSuperset, kSign>(y);
#endif
}

// Bits log_h .. log_h+kRadix-1 (all strides >= one vector) on radix groups [g_begin, g_end) of one row. A
// group is the 2^kRadix vectors at offsets base + k + j*h (j < 2^kRadix), held in registers for all kRadix
// stages. kFirst: also the in-vector bits first, reading src and writing dst; otherwise in place (src == dst).
template <class Tr, bool kSuperset, int kSign, int kRadix, bool kFirst>
SFTINT_ALWAYS_INLINE void radix_sweep(const typename Tr::Scalar* src, typename Tr::Scalar* dst, int log_h,
                                      int64_t g_begin, int64_t g_end) {
  using V = typename Tr::V;
  constexpr int kWidth = 1 << kRadix;
  const int64_t h = int64_t{1} << log_h;
  const int log_groups_per_block = log_h - Tr::kLogLanes;  // a block of h << kRadix values holds h / lanes groups
  const int64_t in_block_mask = (int64_t{1} << log_groups_per_block) - 1;
  for (int64_t g = g_begin; g < g_end; ++g) {
    const int64_t off = ((g >> log_groups_per_block) << (log_h + kRadix)) + ((g & in_block_mask) << Tr::kLogLanes);
    V y[kWidth];
#pragma GCC unroll 8
    for (int j = 0; j < kWidth; ++j) y[j] = load<V>(src + off + j * h);
    if (kFirst) {
#pragma GCC unroll 8
      for (int j = 0; j < kWidth; ++j) in_vector_bits<Tr, kSuperset, kSign>(y[j]);
    }
#pragma GCC unroll 3
    for (int s = 0; s < kRadix; ++s) {
#pragma GCC unroll 8
      for (int j = 0; j < kWidth; ++j) {
        if (!(j & (1 << s))) butterfly<kSuperset, kSign>(y[j], y[j | (1 << s)]);
      }
    }
#pragma GCC unroll 8
    for (int j = 0; j < kWidth; ++j) store(dst + off + j * h, y[j]);
  }
}

// The sweeps of a row cover bits log2(lanes) .. n-1, three at a time from the lowest: the one starting at bit b
// does sweep_radix(n, b) bits on sweep_groups(...) radix groups. (Plain loops, no lambdas, in the kernels: a
// lambda's body would not inherit the AVX2 target attribute of the function it is written in.)
inline int sweep_radix(int n, int b) { return std::min(3, n - b); }
inline int64_t sweep_groups(int n, int radix, int log_lanes) { return int64_t{1} << (n - radix - log_lanes); }

template <class Tr, bool kSuperset, int kSign>
SFTINT_ALWAYS_INLINE void sweep_impl(const typename Tr::Scalar* src, typename Tr::Scalar* dst, int log_h, int radix,
                                     bool first, int64_t g_begin, int64_t g_end) {
  if (first) {
    if (radix == 3) radix_sweep<Tr, kSuperset, kSign, 3, true>(src, dst, log_h, g_begin, g_end);
    if (radix == 2) radix_sweep<Tr, kSuperset, kSign, 2, true>(src, dst, log_h, g_begin, g_end);
    if (radix == 1) radix_sweep<Tr, kSuperset, kSign, 1, true>(src, dst, log_h, g_begin, g_end);
  } else {
    if (radix == 3) radix_sweep<Tr, kSuperset, kSign, 3, false>(dst, dst, log_h, g_begin, g_end);
    if (radix == 2) radix_sweep<Tr, kSuperset, kSign, 2, false>(dst, dst, log_h, g_begin, g_end);
    if (radix == 1) radix_sweep<Tr, kSuperset, kSign, 1, false>(dst, dst, log_h, g_begin, g_end);
  }
}

// dst = transform(src) for one row of 2^n values, n >= log2(lanes).
template <class Tr, bool kSuperset, int kSign>
SFTINT_ALWAYS_INLINE void row_impl(const typename Tr::Scalar* src, typename Tr::Scalar* dst, int n) {
  if (n == Tr::kLogLanes) {
    typename Tr::V y = load<typename Tr::V>(src);
    in_vector_bits<Tr, kSuperset, kSign>(y);
    store(dst, y);
    return;
  }
  for (int b = Tr::kLogLanes; b < n; b += sweep_radix(n, b)) {
    const int radix = sweep_radix(n, b);
    sweep_impl<Tr, kSuperset, kSign>(src, dst, b, radix, b == Tr::kLogLanes, 0, sweep_groups(n, radix, Tr::kLogLanes));
  }
}

// Rows [r_begin, r_end); rows shorter than one vector take the scalar kernel.
template <class Tr, bool kSuperset, int kSign>
SFTINT_ALWAYS_INLINE void rows_impl(const typename Tr::Scalar* src, typename Tr::Scalar* dst, int64_t r_begin,
                                    int64_t r_end, int n) {
  using T = typename Tr::Scalar;
  const int64_t size = int64_t{1} << n;
  for (int64_t r = r_begin; r < r_end; ++r) {
    if (n < Tr::kLogLanes) {
      row_impl<ScalarTraits<T>, kSuperset, kSign>(src + r * size, dst + r * size, n);
    } else {
      row_impl<Tr, kSuperset, kSign>(src + r * size, dst + r * size, n);
    }
  }
}

template <typename T>
using RowsFn = void (*)(const T*, T*, int64_t, int64_t, int);
template <typename T>
using SweepFn = void (*)(const T*, T*, int, int, bool, int64_t, int64_t);

// The kernels of one instruction set: whole rows, or one sweep of one row over a range of radix groups.
template <typename T>
struct Kernels {
  RowsFn<T> rows;
  SweepFn<T> sweep;
  int log_lanes;
};

template <typename T, bool kSuperset, int kSign>
void rows_generic(const T* src, T* dst, int64_t r_begin, int64_t r_end, int n) {
  rows_impl<GenericTraits<T>, kSuperset, kSign>(src, dst, r_begin, r_end, n);
}

template <typename T, bool kSuperset, int kSign>
void sweep_generic(const T* src, T* dst, int log_h, int radix, bool first, int64_t g_begin, int64_t g_end) {
  sweep_impl<GenericTraits<T>, kSuperset, kSign>(src, dst, log_h, radix, first, g_begin, g_end);
}

#if SFTINT_X86_AVX2
template <typename T>
using Avx2Traits = VectorTraits<T, 32>;

template <typename T, bool kSuperset, int kSign>
__attribute__((target("avx2"))) void rows_avx2(const T* src, T* dst, int64_t r_begin, int64_t r_end, int n) {
  rows_impl<Avx2Traits<T>, kSuperset, kSign>(src, dst, r_begin, r_end, n);
}

template <typename T, bool kSuperset, int kSign>
__attribute__((target("avx2"))) void sweep_avx2(const T* src, T* dst, int log_h, int radix, bool first,
                                                int64_t g_begin, int64_t g_end) {
  sweep_impl<Avx2Traits<T>, kSuperset, kSign>(src, dst, log_h, radix, first, g_begin, g_end);
}
#endif

// Which kernels run: chosen once from the CPU (kAuto), or forced (tests and benchmarks compare both).
enum Isa : int { kAuto = -1, kGeneric = 0, kAvx2 = 1 };
std::atomic<int> g_isa{kAuto};

bool cpu_has_avx2() {
#if SFTINT_X86_AVX2
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2");
#else
  return false;
#endif
}

int current_isa() {
  int isa = g_isa.load(std::memory_order_relaxed);
  if (isa == kAuto) {
    isa = cpu_has_avx2() ? kAvx2 : kGeneric;
    g_isa.store(isa, std::memory_order_relaxed);
  }
  return isa;
}

const char* isa_name(int isa) { return isa == kAvx2 ? "avx2" : "generic"; }

template <typename T, bool kSuperset, int kSign>
Kernels<T> kernels() {
#if SFTINT_X86_AVX2
  if (current_isa() == kAvx2) {
    return {&rows_avx2<T, kSuperset, kSign>, &sweep_avx2<T, kSuperset, kSign>, Avx2Traits<T>::kLogLanes};
  }
#endif
  return {&rows_generic<T, kSuperset, kSign>, &sweep_generic<T, kSuperset, kSign>, GenericTraits<T>::kLogLanes};
}

template <typename T, bool kSuperset, int kSign>
void butterfly_rows(const T* src, T* dst, int64_t rows, int n) {
  const Kernels<T> k = kernels<T, kSuperset, kSign>();
  const int64_t size = int64_t{1} << n;
  if (rows >= at::get_num_threads() || size < 2 * kGrainValues) {
    at::parallel_for(0, rows, std::max<int64_t>(1, kGrainValues >> n),
                     [&](int64_t begin, int64_t end) { k.rows(src, dst, begin, end, n); });
    return;
  }
  // A few huge rows: each sweep of a row is split over threads (its radix groups are independent).
  for (int64_t r = 0; r < rows; ++r) {
    const T* row_src = src + r * size;
    T* row_dst = dst + r * size;
    for (int b = k.log_lanes; b < n; b += sweep_radix(n, b)) {
      const int radix = sweep_radix(n, b);
      const int64_t grain = std::max<int64_t>(1, kGrainValues >> (radix + k.log_lanes));
      at::parallel_for(0, sweep_groups(n, radix, k.log_lanes), grain, [&](int64_t begin, int64_t end) {
        k.sweep(row_src, row_dst, b, radix, b == k.log_lanes, begin, end);
      });
    }
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
  const at::Tensor src = x.contiguous();
  at::Tensor out = at::empty(src.sizes(), src.options());
  const int64_t size = src.size(-1);
  const int64_t rows = src.numel() / size;
  int n = 0;
  while ((int64_t{1} << n) < size) ++n;
  AT_DISPATCH_FLOATING_TYPES(out.scalar_type(), "sftint_butterfly", [&] {
    butterfly_rows<scalar_t, kSuperset, kSign>(src.const_data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), rows, n);
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

// A Python module named sftint_fast._C so that `import sftint_fast._C` loads the library (and its ops), with
// two functions that name (and, for tests and benchmarks, force) the butterfly kernels' instruction set.
extern "C" {
#include <Python.h>

static PyObject* sftint_butterfly_isa(PyObject*, PyObject*) {
  return PyUnicode_FromString(sftint::isa_name(sftint::current_isa()));
}

static PyObject* sftint_set_butterfly_isa(PyObject*, PyObject* arg) {
  const char* name = PyUnicode_Check(arg) ? PyUnicode_AsUTF8(arg) : nullptr;
  if (name == nullptr) {
    PyErr_Format(PyExc_TypeError, "set_butterfly_isa: expected a str ('auto', 'avx2' or 'generic'), got %s",
                 Py_TYPE(arg)->tp_name);
    return nullptr;
  }
  const int previous = sftint::current_isa();
  if (std::strcmp(name, "auto") == 0) {
    sftint::g_isa.store(sftint::kAuto);
  } else if (std::strcmp(name, "generic") == 0) {
    sftint::g_isa.store(sftint::kGeneric);
  } else if (std::strcmp(name, "avx2") == 0 && sftint::cpu_has_avx2()) {
    sftint::g_isa.store(sftint::kAvx2);
  } else {
    PyErr_Format(PyExc_ValueError, "set_butterfly_isa: expected 'auto', 'generic'%s, got '%s'",
                 sftint::cpu_has_avx2() ? " or 'avx2'" : " ('avx2' needs an x86-64 CPU with AVX2)", name);
    return nullptr;
  }
  return PyUnicode_FromString(sftint::isa_name(previous));
}

static PyMethodDef sftint_methods[] = {
    {"butterfly_isa", sftint_butterfly_isa, METH_NOARGS,
     "butterfly_isa() -> str: the instruction set of the butterfly kernels in use ('avx2' or 'generic')."},
    {"set_butterfly_isa", sftint_set_butterfly_isa, METH_O,
     "set_butterfly_isa(name) -> str: force 'avx2' or 'generic' kernels, or 'auto' (best for this CPU); "
     "returns the previous one."},
    {nullptr, nullptr, 0, nullptr}};

static struct PyModuleDef sftint_module = {PyModuleDef_HEAD_INIT, "_C", "sftint_fast C++ ops (torch.ops.sftint)", -1,
                                           sftint_methods};
PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&sftint_module); }
}
