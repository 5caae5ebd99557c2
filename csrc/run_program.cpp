// The torch kernels' contraction program (tenvoo_fast/contraction/program.py) run from C++:
// the same strided batched matmuls and relayout copies as the Python runner, issued without a
// Python call per operand view. Each instruction is an ATen call through the dispatcher, so a
// launch counter (a TorchDispatchMode) sees every one, and any device runs it.
//
// The program is flattened once per program into ``table``, an int64 CPU tensor
// (tenvoo_fast/contraction/native_runner.py writes it); per call the caller passes, for every tensor id, the buffer it
// lies in and its element offset there. Records:
//   kMatMul: a, b, out as (id, size0..2, stride0..2)            -> at::bmm_out(out, a, b)
//   kCopy:   ndim, dst id, sizes[ndim], dst strides[ndim], src id, src strides[ndim]
//   kGroup:  count, then count kCopy records                   -> one at::_foreach_copy_
//
// With ``loops`` set, a small instruction on CPU fp32/fp64 tensors runs as a plain loop over
// the strided views instead: on the program's strided, often batch-broadcast operands ATen's
// CPU bmm pays per batch element and per odd layout far more than the few thousand
// multiply-adds cost (README, "Launches and host time"). The loop accumulates each output element in the contraction dtype,
// in index order. With ``watched`` also set (a dispatch mode is active: a launch counter, a
// tracer), each looped instruction is issued as its ATen call first, so the watcher sees the
// calls the program makes on a GPU, and the loop's result is what is kept: watching never
// changes the numbers.
#include "tenvoo_fast/run_program.h"

#include <ATen/ATen.h>
#include <torch/extension.h>

#include <array>
#include <vector>

namespace tenvoo_fast {
namespace {

constexpr int64_t kMatMul = 0;
constexpr int64_t kCopy = 1;
constexpr int64_t kGroup = 2;

struct Reader {
  const int64_t* table;
  int64_t size;
  int64_t pos = 0;
  int64_t next() {
    TORCH_CHECK(pos < size, "tenvoo_fast run_program: table ends early at ", pos);
    return table[pos++];
  }
  c10::IntArrayRef span(int64_t n) {
    TORCH_CHECK(n >= 0 && pos + n <= size, "tenvoo_fast run_program: bad length ", n);
    c10::IntArrayRef out(table + pos, n);
    pos += n;
    return out;
  }
};

// One tensor of an instruction: which place, and its sizes and strides there.
struct Strided {
  int64_t id;
  c10::IntArrayRef size;
  c10::IntArrayRef stride;
  int64_t numel() const {
    int64_t n = 1;
    for (int64_t s : size) n *= s;
    return n;
  }
};

Strided matrix(Reader& r) {
  int64_t id = r.next();
  c10::IntArrayRef size = r.span(3);
  return {id, size, r.span(3)};
}

std::pair<Strided, Strided> copy_pair(Reader& r) {
  TORCH_CHECK(r.next() == kCopy, "tenvoo_fast run_program: expected a copy record");
  int64_t ndim = r.next();
  int64_t dst = r.next();
  c10::IntArrayRef size = r.span(ndim);
  c10::IntArrayRef dst_stride = r.span(ndim);
  int64_t src = r.next();
  return {{dst, size, dst_stride}, {src, size, r.span(ndim)}};
}

struct Places {
  const std::vector<at::Tensor>& bases;
  const std::vector<int64_t>& offsets;

  const at::Tensor& base(int64_t id) const {
    TORCH_CHECK(id >= 0 && id < static_cast<int64_t>(bases.size()),
                "tenvoo_fast run_program: tensor id ", id, " out of range");
    return bases[id];
  }
  at::Tensor view(const Strided& t) const {
    // (An id the caller gave no place holds an empty tensor: as_strided's bounds check
    // refuses any non-empty view of it.)
    const at::Tensor& b = base(t.id);
    return b.as_strided(t.size, t.stride, b.storage_offset() + offsets[t.id]);
  }
  // The first element of ``t`` for the loops, with as_strided's bounds check.
  template <typename T>
  T* pointer(const Strided& t) const {
    const at::Tensor& b = base(t.id);
    int64_t first = b.storage_offset() + offsets[t.id], last = first;
    for (size_t d = 0; d < t.size.size(); ++d) {
      if (t.size[d] == 0) return nullptr;
      TORCH_CHECK(t.stride[d] >= 0, "tenvoo_fast run_program: negative stride");
      last += (t.size[d] - 1) * t.stride[d];
    }
    TORCH_CHECK(first >= 0 && (last + 1) * static_cast<int64_t>(sizeof(T)) <=
                                  static_cast<int64_t>(b.storage().nbytes()),
                "tenvoo_fast run_program: tensor id ", t.id, " lies outside its buffer");
    return static_cast<T*>(b.storage().mutable_data()) + first;
  }
};

// Largest instruction the loops take (multiply-adds for a matmul, elements for a copy); above
// it the ATen call is faster than a scalar loop.
constexpr int64_t kLoopLimit = 1 << 15;
// A matmul whose layout ATen's CPU bmm handles badly (a batch of several, a broadcast batch,
// or a matrix with no unit stride: it selects per batch element or copies first, several times
// the cost of one plain GEMM of the same size) is looped up to this size instead.
constexpr int64_t kOddLayoutLoopLimit = 1 << 18;

// Largest weight the fold loop takes: ATen's elementwise kernels vectorise and thread above.
constexpr int64_t kFoldLimit = 1 << 17;

bool plain_gemm(int64_t batch, c10::IntArrayRef as, c10::IntArrayRef bs, c10::IntArrayRef os) {
  auto unit = [](c10::IntArrayRef st) { return st[1] == 1 || st[2] == 1; };
  return batch == 1 && unit(as) && unit(bs) && unit(os);
}

bool loop_matmul(int64_t batch, int64_t m, int64_t n, int64_t k, c10::IntArrayRef as,
                 c10::IntArrayRef bs, c10::IntArrayRef os) {
  const int64_t work = batch * m * n * k;
  return work <= kLoopLimit || (work <= kOddLayoutLoopLimit && !plain_gemm(batch, as, bs, os));
}

// Output columns one pass of the inner loop keeps in registers.
constexpr int64_t kColumns = 16;

// out[z, i, j] = sum_q a[z, i, q] * b[z, q, j] over (batch, rows, cols) strided views, as rows:
// row i of out = sum over q, in order, of a[i, q] * row q of b. Every element is summed over q
// in order from zero (no FMA: built with -ffp-contract=off), whatever the layouts; the inner
// loop runs over unit strides (b's rows packed, and out's row staged, where they are not), so
// the compiler vectorises it.

// W consecutive outputs of one row, their sums held in registers over q.
template <typename T, int64_t W>
inline void row_block(const T* ra, int64_t a2, const T* brows, int64_t ldb, int64_t k,
                      T* __restrict__ out) {
  T acc[W] = {};
  for (int64_t q = 0; q < k; ++q) {
    const T s = ra[q * a2];
    const T* __restrict__ brow = brows + q * ldb;
    for (int64_t u = 0; u < W; ++u) acc[u] += s * brow[u];
  }
  for (int64_t u = 0; u < W; ++u) out[u] = acc[u];
}

template <typename T>
void matmul_rows(const T* pa, c10::IntArrayRef as, const T* pb, c10::IntArrayRef bs, T* po,
                 c10::IntArrayRef size, c10::IntArrayRef os, int64_t k) {
  const int64_t nb = size[0], m = size[1], n = size[2];
  const int64_t a0 = as[0], a1 = as[1], a2 = as[2];
  const int64_t b0 = bs[0], b1 = bs[1], b2 = bs[2];
  const int64_t o0 = os[0], o1 = os[1], o2 = os[2];
  thread_local std::vector<T> packed, staged;
  const bool pack = b2 != 1 && n > 1;
  if (pack) packed.resize(k * n);
  if (o2 != 1) staged.resize(n);
  for (int64_t z = 0; z < nb; ++z) {
    const T* rows_b = pb + z * b0;
    int64_t ldb = b1;
    if (pack) {
      if (z == 0 || b0 != 0)
        for (int64_t q = 0; q < k; ++q)
          for (int64_t j = 0; j < n; ++j) packed[q * n + j] = rows_b[q * b1 + j * b2];
      rows_b = packed.data();
      ldb = n;
    }
    for (int64_t i = 0; i < m; ++i) {
      T* __restrict__ row = o2 == 1 ? po + z * o0 + i * o1 : staged.data();
      const T* ra = pa + z * a0 + i * a1;
      int64_t j = 0;
      for (; j + kColumns <= n; j += kColumns)
        row_block<T, kColumns>(ra, a2, rows_b + j, ldb, k, row + j);
      if (j + kColumns / 2 <= n) {
        row_block<T, kColumns / 2>(ra, a2, rows_b + j, ldb, k, row + j);
        j += kColumns / 2;
      }
      if (j + kColumns / 4 <= n) {
        row_block<T, kColumns / 4>(ra, a2, rows_b + j, ldb, k, row + j);
        j += kColumns / 4;
      }
      for (; j < n; ++j) row_block<T, 1>(ra, a2, rows_b + j, ldb, k, row + j);
      if (o2 != 1)
        for (int64_t j = 0; j < n; ++j) po[z * o0 + i * o1 + j * o2] = row[j];
    }
  }
}

template <typename T>
void matmul_loop(const T* pa, c10::IntArrayRef as, const T* pb, c10::IntArrayRef bs, T* po,
                 c10::IntArrayRef size, c10::IntArrayRef os, int64_t k) {
  if (size[1] > size[2]) {
    // Longer rows than columns: compute out^T = b^T a^T instead, so that the vectorised inner
    // loop runs over the longer side (the same products, summed in the same order).
    const int64_t at[3] = {bs[0], bs[2], bs[1]}, bt[3] = {as[0], as[2], as[1]};
    const int64_t ot[3] = {os[0], os[2], os[1]}, st[3] = {size[0], size[2], size[1]};
    matmul_rows<T>(pb, at, pa, bt, po, st, ot, k);
    return;
  }
  matmul_rows<T>(pa, as, pb, bs, po, size, os, k);
}

template <typename T>
void matmul_loop(const Places& p, const Strided& a, const Strided& b, const Strided& out) {
  T* po = p.pointer<T>(out);
  if (po == nullptr) return;
  const T* pa = p.pointer<T>(a);
  const T* pb = p.pointer<T>(b);
  if (a.size[2] > 0)
    TORCH_CHECK(pa != nullptr && pb != nullptr, "tenvoo_fast run_program: empty operand");
  matmul_loop<T>(pa, a.stride, pb, b.stride, po, out.size, out.stride, a.size[2]);
}

// Calls row(offsets, n, inner strides) for every innermost row of ``shape``: offsets[t] is
// operand t's element offset of the row's first element (an odometer over the outer dims).
template <size_t N, typename Row>
void for_each_row(c10::IntArrayRef shape, const std::array<c10::IntArrayRef, N>& strides,
                  Row row) {
  const int64_t ndim = static_cast<int64_t>(shape.size());
  std::array<int64_t, N> off{}, inner{};
  if (ndim == 0) {
    row(off, 1, inner);
    return;
  }
  for (int64_t s : shape)
    if (s == 0) return;
  for (size_t t = 0; t < N; ++t) inner[t] = strides[t][ndim - 1];
  std::vector<int64_t> index(ndim - 1, 0);
  while (true) {
    row(off, shape[ndim - 1], inner);
    int64_t d = ndim - 2;
    for (; d >= 0; --d) {
      if (++index[d] < shape[d]) {
        for (size_t t = 0; t < N; ++t) off[t] += strides[t][d];
        break;
      }
      for (size_t t = 0; t < N; ++t) off[t] -= (shape[d] - 1) * strides[t][d];
      index[d] = 0;
    }
    if (d < 0) return;
  }
}

template <typename T>
void copy_loop(const Places& p, const Strided& dst, const Strided& src) {
  T* pd = p.pointer<T>(dst);
  if (pd == nullptr) return;
  const T* ps = p.pointer<T>(src);
  for_each_row<2>(dst.size, {dst.stride, src.stride},
                  [&](const std::array<int64_t, 2>& o, int64_t n, const std::array<int64_t, 2>& st) {
                    T* d = pd + o[0];
                    const T* s = ps + o[1];
                    for (int64_t e = 0; e < n; ++e) d[e * st[0]] = s[e * st[1]];
                  });
}

// Whether every placed tensor is a CPU tensor of one loopable dtype (then that dtype).
c10::optional<at::ScalarType> loop_dtype(const std::vector<at::Tensor>& bases) {
  c10::optional<at::ScalarType> dtype;
  for (const at::Tensor& b : bases) {
    if (!b.defined() || b.numel() == 0) continue;
    if (!b.device().is_cpu()) return c10::nullopt;
    at::ScalarType t = b.scalar_type();
    if (t != at::kFloat && t != at::kDouble) return c10::nullopt;
    if (dtype && *dtype != t) return c10::nullopt;
    dtype = t;
  }
  return dtype;
}

}  // namespace

void run_program(const std::vector<at::Tensor>& bases, const std::vector<int64_t>& offsets,
                 const at::Tensor& table, bool loops, bool watched) {
  TORCH_CHECK(bases.size() == offsets.size(), "tenvoo_fast run_program: ", bases.size(),
              " places but ", offsets.size(), " offsets");
  TORCH_CHECK(table.device().is_cpu() && table.scalar_type() == at::kLong &&
                  table.dim() == 1 && table.is_contiguous(),
              "tenvoo_fast run_program: the table must be a contiguous 1-D int64 CPU tensor");
  Places places{bases, offsets};
  c10::optional<at::ScalarType> dtype = loops ? loop_dtype(bases) : c10::nullopt;
  const bool fp64 = dtype && *dtype == at::kDouble;
  auto copy = [&](const Strided& dst, const Strided& src) {  // true: done by a loop
    // (Copies are exact either way: watched, the ATen call alone does them.)
    if (!dtype || watched || dst.numel() > kLoopLimit) return false;
    fp64 ? copy_loop<double>(places, dst, src) : copy_loop<float>(places, dst, src);
    return true;
  };
  Reader r{table.data_ptr<int64_t>(), table.numel()};
  while (r.pos < r.size) {
    int64_t kind = r.table[r.pos];
    if (kind == kMatMul) {
      r.next();
      Strided a = matrix(r), b = matrix(r), out = matrix(r);
      const bool loop = dtype && loop_matmul(out.size[0], out.size[1], out.size[2], a.size[2],
                                             a.stride, b.stride, out.stride);
      if (!loop || watched) {
        at::Tensor o = places.view(out);
        at::bmm_out(o, places.view(a), places.view(b));
      }
      if (loop)
        fp64 ? matmul_loop<double>(places, a, b, out) : matmul_loop<float>(places, a, b, out);
    } else if (kind == kCopy) {
      auto pair = copy_pair(r);
      if (!copy(pair.first, pair.second)) places.view(pair.first).copy_(places.view(pair.second));
    } else if (kind == kGroup) {
      r.next();
      int64_t count = r.next();
      TORCH_CHECK(count >= 0 && count <= r.size - r.pos,
                  "tenvoo_fast run_program: bad group size ", count);
      std::vector<at::Tensor> dst, src;
      for (int64_t i = 0; i < count; ++i) {
        auto pair = copy_pair(r);
        if (copy(pair.first, pair.second)) continue;
        dst.push_back(places.view(pair.first));
        src.push_back(places.view(pair.second));
      }
      if (!dst.empty()) at::_foreach_copy_(dst, src);
    } else {
      TORCH_CHECK(false, "tenvoo_fast run_program: unknown record kind ", kind, " at ", r.pos);
    }
  }
}

// at::bmm_out(out, a, b), as a loop when ``loops`` and the operands are small CPU fp32/fp64
// tensors of one dtype (the weight-sized step's GEMM of a small layer); ``watched`` as above.
void matmul_out(const at::Tensor& a, const at::Tensor& b, at::Tensor& out, bool loops,
                bool watched) {
  TORCH_CHECK(a.dim() == 3 && b.dim() == 3 && out.dim() == 3 && a.size(0) == out.size(0) &&
                  b.size(0) == out.size(0) && a.size(1) == out.size(1) &&
                  b.size(2) == out.size(2) && a.size(2) == b.size(1),
              "tenvoo_fast matmul_out: shapes ", a.sizes(), " @ ", b.sizes(), " -> ", out.sizes());
  const at::ScalarType t = out.scalar_type();
  if (loops && (t == at::kFloat || t == at::kDouble) && a.scalar_type() == t &&
      b.scalar_type() == t && a.device().is_cpu() && b.device().is_cpu() &&
      out.device().is_cpu() &&
      loop_matmul(out.size(0), out.size(1), out.size(2), a.size(2), a.strides(), b.strides(),
                  out.strides())) {
    if (watched) at::bmm_out(out, a, b);
    if (out.numel() == 0) return;
    if (t == at::kFloat)
      matmul_loop<float>(a.const_data_ptr<float>(), a.strides(), b.const_data_ptr<float>(),
                         b.strides(), out.mutable_data_ptr<float>(), out.sizes(), out.strides(),
                         a.size(2));
    else
      matmul_loop<double>(a.const_data_ptr<double>(), a.strides(), b.const_data_ptr<double>(),
                          b.strides(), out.mutable_data_ptr<double>(), out.sizes(),
                          out.strides(), a.size(2));
    return;
  }
  at::bmm_out(out, a, b);
}

namespace {

// out = base + (t - frozen) (``frozen`` undefined: base + t), elementwise over one shape with
// any strides, the difference rounded first as the torch ops round it (two additions, no FMA).
template <typename T>
void fold_loop(const at::Tensor& t, const at::Tensor& frozen, const at::Tensor& base,
               at::Tensor& out) {
  const T* pt = t.const_data_ptr<T>();
  const T* pw = base.const_data_ptr<T>();
  T* po = out.mutable_data_ptr<T>();
  if (frozen.defined()) {
    const T* pf = frozen.const_data_ptr<T>();
    for_each_row<4>(out.sizes(), {out.strides(), base.strides(), t.strides(), frozen.strides()},
                    [&](const std::array<int64_t, 4>& o, int64_t n,
                        const std::array<int64_t, 4>& st) {
                      for (int64_t e = 0; e < n; ++e)
                        po[o[0] + e * st[0]] =
                            pw[o[1] + e * st[1]] + (pt[o[2] + e * st[2]] - pf[o[3] + e * st[3]]);
                    });
  } else {
    for_each_row<3>(out.sizes(), {out.strides(), base.strides(), t.strides()},
                    [&](const std::array<int64_t, 3>& o, int64_t n,
                        const std::array<int64_t, 3>& st) {
                      for (int64_t e = 0; e < n; ++e)
                        po[o[0] + e * st[0]] = pw[o[1] + e * st[1]] + pt[o[2] + e * st[2]];
                    });
  }
}

}  // namespace

// The last step's fold W + (T - T0) as one loop, when ``loops``, unwatched, and all of one CPU
// fp32/fp64 dtype and one shape up to the loop limit for elementwise work; false: not done (the
// caller runs the torch ops, which give the same bits).
bool fold_out(const at::Tensor& t, const c10::optional<at::Tensor>& frozen,
              const at::Tensor& base, at::Tensor& out, bool loops, bool watched) {
  const at::ScalarType type = out.scalar_type();
  if (!loops || watched || (type != at::kFloat && type != at::kDouble) ||
      out.numel() > kFoldLimit)
    return false;
  for (const at::Tensor* x : std::initializer_list<const at::Tensor*>{&t, &base, &out})
    if (!x->device().is_cpu() || x->scalar_type() != type || x->sizes() != out.sizes())
      return false;
  at::Tensor f = frozen.has_value() ? *frozen : at::Tensor();
  if (f.defined() &&
      (!f.device().is_cpu() || f.scalar_type() != type || f.sizes() != out.sizes()))
    return false;
  if (type == at::kFloat)
    fold_loop<float>(t, f, base, out);
  else
    fold_loop<double>(t, f, base, out);
  return true;
}

void bind_run_program(pybind11::module& m) {
  m.def("run_program", &run_program, "Run a flattened contraction program (see csrc/run_program.cpp)",
        pybind11::arg("bases"), pybind11::arg("offsets"), pybind11::arg("table"),
        pybind11::arg("loops") = false, pybind11::arg("watched") = false);
  m.def("fold_out", &fold_out, "out = base + (t - frozen) as a loop when small (see csrc/run_program.cpp)",
        pybind11::arg("t"), pybind11::arg("frozen"), pybind11::arg("base"), pybind11::arg("out"),
        pybind11::arg("loops") = false, pybind11::arg("watched") = false);
  m.def("matmul_out", &matmul_out, "bmm into out, as a loop when small (see csrc/run_program.cpp)",
        pybind11::arg("a"), pybind11::arg("b"), pybind11::arg("out"),
        pybind11::arg("loops") = false, pybind11::arg("watched") = false);
}

}  // namespace tenvoo_fast
