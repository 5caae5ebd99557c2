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
#include <ATen/ATen.h>
#include <torch/extension.h>

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

struct Places {
  const std::vector<at::Tensor>& bases;
  const std::vector<int64_t>& offsets;
  at::Tensor view(int64_t id, c10::IntArrayRef size, c10::IntArrayRef stride) const {
    // (An id the caller gave no place holds an empty tensor: as_strided's bounds check
    // refuses any non-empty view of it.)
    TORCH_CHECK(id >= 0 && id < static_cast<int64_t>(bases.size()),
                "tenvoo_fast run_program: tensor id ", id, " out of range");
    const at::Tensor& base = bases[id];
    return base.as_strided(size, stride, base.storage_offset() + offsets[id]);
  }
};

at::Tensor matrix(Reader& r, const Places& p) {
  int64_t id = r.next();
  c10::IntArrayRef size = r.span(3);
  c10::IntArrayRef stride = r.span(3);
  return p.view(id, size, stride);
}

std::pair<at::Tensor, at::Tensor> copy_pair(Reader& r, const Places& p) {
  TORCH_CHECK(r.next() == kCopy, "tenvoo_fast run_program: expected a copy record");
  int64_t ndim = r.next();
  int64_t dst = r.next();
  c10::IntArrayRef size = r.span(ndim);
  c10::IntArrayRef dst_stride = r.span(ndim);
  int64_t src = r.next();
  c10::IntArrayRef src_stride = r.span(ndim);
  return {p.view(dst, size, dst_stride), p.view(src, size, src_stride)};
}

void run_program(const std::vector<at::Tensor>& bases, const std::vector<int64_t>& offsets,
                 const at::Tensor& table) {
  TORCH_CHECK(bases.size() == offsets.size(), "tenvoo_fast run_program: ", bases.size(),
              " places but ", offsets.size(), " offsets");
  TORCH_CHECK(table.device().is_cpu() && table.scalar_type() == at::kLong &&
                  table.dim() == 1 && table.is_contiguous(),
              "tenvoo_fast run_program: the table must be a contiguous 1-D int64 CPU tensor");
  Places places{bases, offsets};
  Reader r{table.data_ptr<int64_t>(), table.numel()};
  while (r.pos < r.size) {
    int64_t kind = r.table[r.pos];
    if (kind == kMatMul) {
      r.next();
      at::Tensor a = matrix(r, places);
      at::Tensor b = matrix(r, places);
      at::Tensor out = matrix(r, places);
      at::bmm_out(out, a, b);
    } else if (kind == kCopy) {
      auto pair = copy_pair(r, places);
      pair.first.copy_(pair.second);
    } else if (kind == kGroup) {
      r.next();
      int64_t count = r.next();
      TORCH_CHECK(count >= 0 && count <= r.size - r.pos,
                  "tenvoo_fast run_program: bad group size ", count);
      std::vector<at::Tensor> dst, src;
      dst.reserve(count);
      src.reserve(count);
      for (int64_t i = 0; i < count; ++i) {
        auto pair = copy_pair(r, places);
        dst.push_back(pair.first);
        src.push_back(pair.second);
      }
      at::_foreach_copy_(dst, src);
    } else {
      TORCH_CHECK(false, "tenvoo_fast run_program: unknown record kind ", kind, " at ", r.pos);
    }
  }
}

}  // namespace

void bind_run_program(pybind11::module& m) {
  m.def("run_program", &run_program, "Run a flattened contraction program (see csrc/run_program.cpp)",
        pybind11::arg("bases"), pybind11::arg("offsets"), pybind11::arg("table"));
}

}  // namespace tenvoo_fast
