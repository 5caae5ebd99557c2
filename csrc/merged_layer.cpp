// A merged adapted layer (conv3d or linear) as one C++ autograd function: the ``merged``
// strategy's torch path (tenvoo_fast/ops/merged.py with the compiled contraction program of
// tenvoo_fast/contraction/program.py) with no Python between its steps.
//
// forward:  the pre-reduced cores -> the program (run_program) -> the last step's GEMM and the
//           fold W + (scale*T - T0), cast to x's dtype -> conv3d / linear;
// backward: the kept buffer (+ the forward instructions it did not keep) -> the weight rebuilt
//           (unless kept) -> the framework's conv / linear backward -> scale*dL/dW as the
//           program reads it -> the reverse program -> every core's gradient in one flat buffer
//           (views of it, one per core).
//
// The same ATen calls and loops, in the same order, as the Python runner: the same bits. What a
// layer's program needs (where each tensor lies, the flattened instructions, the last step's
// shapes) is worked out once in Python (tenvoo_fast/kernels/native_layer.py) into a
// ``MergedPlan``. Used on the CPU when no dispatch mode watches and nothing traces: there the
// Python per step costs more host time than the adapter's arithmetic.
#include "tenvoo_fast/run_program.h"

#include <ATen/ATen.h>
#include <c10/core/impl/TorchDispatchModeTLS.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/extension.h>

#include <algorithm>
#include <vector>

namespace tenvoo_fast {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// Everything a merged layer's steps need, fixed per (program, layer): made once in Python.
struct MergedPlan : torch::CustomClassHolder {
  int64_t n_cores = 0;
  std::vector<std::vector<int64_t>> core_shapes;  // as the contraction reads them
  std::vector<std::vector<int64_t>> sum_axes;     // the pre-reduction's sums, per core
  int64_t width = 0;                              // the program's tensor ids
  // Per tensor id, where it lies: a place kind (kNone, core i, kept, scratch, flat, dL/dT)
  // and the element offset there; forward and backward each.
  std::vector<int64_t> fwd_kind, fwd_offset, bwd_kind, bwd_offset;
  int64_t kept_numel = 0, fwd_scratch_numel = 0, bwd_scratch_numel = 0, flat_numel = 0;
  at::Tensor pack_table, forward_table, recompute_table, backward_table;
  std::vector<int64_t> left, right;        // the last step's operands: id, size[3], stride[3]
  std::vector<int64_t> gemm;               // B, M, N
  std::vector<int64_t> gemm_shape, to_weight, letters;  // T's letters; to the weight's order
  double scale = 1.0;
  bool keeps_cores = false;                // the kept buffer holds every (pre-reduced) core
  bool direct = false;                     // core gradients made in place in the flat output
  int64_t grad_t = 0;
  bool grad_as_weight = false;             // dL/dT read as the weight lies
  at::Tensor unpack_index;                 // else: gathered from the backward's scratch
  std::vector<int64_t> stride, padding, dilation;  // empty: a linear layer

  int64_t kind_kept() const { return n_cores; }
  int64_t kind_scratch() const { return n_cores + 1; }
  int64_t kind_flat() const { return n_cores + 2; }
  int64_t kind_grad_t() const { return n_cores + 3; }

  void check() const {
    const size_t w = static_cast<size_t>(width);
    TORCH_CHECK(fwd_kind.size() == w && fwd_offset.size() == w && bwd_kind.size() == w &&
                    bwd_offset.size() == w,
                "tenvoo_fast MergedPlan: place tables must name all ", width, " tensor ids");
    TORCH_CHECK(core_shapes.size() == static_cast<size_t>(n_cores) &&
                    sum_axes.size() == static_cast<size_t>(n_cores),
                "tenvoo_fast MergedPlan: per-core fields must have ", n_cores, " entries");
    TORCH_CHECK(left.size() == 7 && right.size() == 7 && gemm.size() == 3,
                "tenvoo_fast MergedPlan: bad last-step operands");
    TORCH_CHECK(stride.empty() || (stride.size() == 3 && padding.size() == 3 &&
                                   dilation.size() == 3),
                "tenvoo_fast MergedPlan: conv geometry needs 3 strides, paddings, dilations");
    TORCH_CHECK(direct || unpack_index.defined(),
                "tenvoo_fast MergedPlan: no unpack index for a program that unpacks");
    for (size_t t = 0; t < w; ++t) {
      TORCH_CHECK(fwd_kind[t] >= -1 && fwd_kind[t] <= kind_scratch() && bwd_kind[t] >= -1 &&
                      bwd_kind[t] <= kind_grad_t() && fwd_offset[t] >= 0 && bwd_offset[t] >= 0,
                  "tenvoo_fast MergedPlan: bad place of tensor id ", t);
    }
    for (int64_t id : {left[0], right[0], grad_t})
      TORCH_CHECK(id >= 0 && id < width, "tenvoo_fast MergedPlan: tensor id ", id,
                  " out of range (", width, " ids)");
  }
};

// Whether a dispatch mode watches now (a launch counter, a tracer): then every looped
// instruction is also issued as its ATen call (run_program.cpp), so a backward watched on its
// own is counted as the Python op's would be. Asked on each call, not at forward time.
bool watched() { return c10::impl::TorchDispatchModeTLS::stack_len() > 0; }

// The pre-reduced cores (the pre-reduction's sums; a core read as it lies otherwise).
std::vector<at::Tensor> reduced(const MergedPlan& p, at::TensorList cores) {
  std::vector<at::Tensor> out;
  out.reserve(cores.size());
  for (int64_t i = 0; i < p.n_cores; ++i) {
    const at::Tensor& c = cores[i];
    if (p.sum_axes[i].empty())
      out.push_back(c.contiguous());
    else
      out.push_back(at::sum(c.reshape(p.core_shapes[i]), p.sum_axes[i], /*keepdim=*/false));
  }
  return out;
}

// Where every tensor id lies, given the buffers of each place kind.
struct Placed {
  std::vector<at::Tensor> bases;
  std::vector<int64_t> offsets;

  at::Tensor view(const std::vector<int64_t>& r) const {
    const at::Tensor& b = bases[r[0]];
    return b.as_strided({r[1], r[2], r[3]}, {r[4], r[5], r[6]},
                        b.storage_offset() + offsets[r[0]]);
  }
};

Placed place(const MergedPlan& p, const std::vector<int64_t>& kind,
             const std::vector<int64_t>& offset, const std::vector<at::Tensor>& cores,
             const std::vector<at::Tensor>& buffers /* kept, scratch, flat, dL/dT */,
             bool sources) {
  static const at::Tensor none = at::empty({0});
  Placed out;
  const size_t n = p.width + (sources ? p.n_cores : 0);
  out.bases.assign(n, none);
  out.offsets.assign(n, 0);
  for (int64_t t = 0; t < p.width; ++t) {
    const int64_t k = kind[t];
    if (k < 0) continue;
    if (k < p.n_cores) {
      if (cores.empty()) continue;  // (the kept buffer holds the cores: not read)
      out.bases[t] = cores[k];
    } else {
      out.bases[t] = buffers[k - p.n_cores];
    }
    out.offsets[t] = offset[t];
  }
  if (sources)
    for (int64_t i = 0; i < p.n_cores; ++i) out.bases[p.width + i] = cores[i];
  return out;
}

void run(const at::Tensor& table, const Placed& places) {
  if (table.defined() && table.numel())
    run_program(places.bases, places.offsets, table, true, watched());
}

// W + (scale*T - T0) in ``dtype``, T = left @ right (as torch_last_step.build_weight).
at::Tensor build_weight(const MergedPlan& p, const Placed& places, const at::Tensor& base,
                        const at::Tensor& frozen, at::ScalarType dtype) {
  at::Tensor left = places.view(p.left), right = places.view(p.right);
  at::Tensor t = at::empty({p.gemm[0], p.gemm[1], p.gemm[2]}, left.options());
  const bool watching = watched();
  matmul_out(left, right, t, true, watching);
  if (p.scale != 1.0) t.mul_(p.scale);
  at::Tensor view = t.view(p.gemm_shape).permute(p.to_weight);
  at::Tensor out = at::empty(base.sizes(), base.options().dtype(dtype));
  at::Tensor frozen_l = frozen.defined() ? frozen.reshape(p.letters) : at::Tensor();
  if (base.is_contiguous()) {
    at::Tensor out_l = out.view(p.letters);
    std::optional<at::Tensor> f =
        frozen.defined() ? std::optional<at::Tensor>(frozen_l) : std::nullopt;
    if (fold_out(view, f, base.view(p.letters), out_l, true, watching)) return out;
  }
  if (!frozen.defined()) {
    at::Tensor out_l = out.view(p.letters);
    at::add_out(out_l, base.reshape(p.letters), view);
    return out;
  }
  at::Tensor diff = dtype == t.scalar_type() ? out : at::empty(base.sizes(), t.options());
  at::Tensor diff_l = diff.view(p.letters);
  at::sub_out(diff_l, view, frozen_l);
  return at::add_out(out, base, diff);
}

// scale * dL/dW as the program reads it (as torch_last_step.grad_gemm).
at::Tensor grad_gemm(const MergedPlan& p, const at::Tensor& gw, at::ScalarType dtype) {
  if (p.grad_as_weight) {
    at::Tensor g = gw.scalar_type() == dtype ? gw : gw.to(dtype);
    if (p.scale != 1.0) return g * p.scale;
    return g.contiguous();
  }
  at::Tensor g = at::empty({p.gemm[0], p.gemm[1], p.gemm[2]}, gw.options().dtype(dtype));
  g.view(p.gemm_shape).permute(p.to_weight).copy_(gw.reshape(p.letters));
  if (p.scale != 1.0) g.mul_(p.scale);
  return g;
}

std::vector<int64_t> dense_strides(c10::IntArrayRef sizes) {
  std::vector<int64_t> out(sizes.size());
  int64_t s = 1;
  for (int64_t d = static_cast<int64_t>(sizes.size()) - 1; d >= 0; --d) {
    out[d] = s;
    s *= std::max<int64_t>(sizes[d], 1);
  }
  return out;
}

at::MemoryFormat memory_format(const at::Tensor& x) {
  if (x.dim() == 5 && !x.is_contiguous() && x.is_contiguous(at::MemoryFormat::ChannelsLast3d))
    return at::MemoryFormat::ChannelsLast3d;
  return at::MemoryFormat::Contiguous;
}

struct MergedLayer : torch::autograd::Function<MergedLayer> {
  static at::Tensor forward(AutogradContext* ctx, c10::intrusive_ptr<MergedPlan> plan,
                            const at::Tensor& x, const at::Tensor& base,
                            const std::optional<at::Tensor>& frozen,
                            const std::optional<at::Tensor>& bias, bool keep_weight,
                            at::TensorList cores) {
    c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
    const MergedPlan& p = *plan;
    const at::Tensor f = frozen.has_value() ? *frozen : at::Tensor();
    const at::Tensor b = bias.has_value() ? *bias : at::Tensor();
    std::vector<at::Tensor> red = reduced(p, cores);
    at::Tensor kept = at::empty({p.kept_numel}, red[0].options());
    at::Tensor scratch = at::empty({p.fwd_scratch_numel}, red[0].options());
    Placed places = place(p, p.fwd_kind, p.fwd_offset, red, {kept, scratch}, true);
    run(p.pack_table, places);
    run(p.forward_table, places);
    at::Tensor w = build_weight(p, places, base, f, x.scalar_type());
    at::Tensor bx = b.defined() ? b.to(x.scalar_type()) : at::Tensor();
    at::Tensor y;
    if (p.stride.empty()) {
      y = at::linear(x, w, bx);
    } else {
      y = at::conv3d(x, w, bx, p.stride, p.padding, p.dilation, 1)
              .contiguous(memory_format(x));
    }
    std::vector<at::Tensor> saved{x, base, f, b, kept, keep_weight ? w : at::Tensor()};
    saved.insert(saved.end(), cores.begin(), cores.end());
    ctx->save_for_backward(saved);
    ctx->saved_data["plan"] = c10::IValue::make_capsule(plan);
    return y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
    at::NoGradGuard no_grad;
    auto plan = c10::static_intrusive_pointer_cast<MergedPlan>(
        ctx->saved_data["plan"].toCapsule());
    const MergedPlan& p = *plan;
    variable_list s = ctx->get_saved_variables();
    const at::Tensor &x = s[0], &base = s[1], &f = s[2], &b = s[3], &kept = s[4], &kw = s[5];
    std::vector<at::Tensor> cores(s.begin() + 6, s.end());
    const int64_t n = p.n_cores;
    // inputs: plan, x, base, frozen, bias, keep_weight, cores...
    variable_list out(6 + n);
    const at::Tensor& grad_out = grads[0];
    if (!grad_out.defined()) return out;
    // (Input edges are the tensors only: x, base, the frozen delta if any, the bias if any.)
    const bool need_x = ctx->needs_input_grad(0);
    const bool need_bias = b.defined() && ctx->needs_input_grad(f.defined() ? 3 : 2);
    const at::ScalarType dtype = kept.scalar_type();

    std::vector<at::Tensor> red = p.keeps_cores ? std::vector<at::Tensor>() : reduced(p, cores);
    at::Tensor scratch = at::empty({p.bwd_scratch_numel}, kept.options());
    at::Tensor flat = p.direct ? at::empty({p.flat_numel}, kept.options()) : at::Tensor();
    Placed places = place(p, p.bwd_kind, p.bwd_offset, red, {kept, scratch, flat, kept}, false);
    run(p.recompute_table, places);
    const bool rebuild = need_x && !kw.defined();
    at::Tensor w = rebuild ? build_weight(p, places, base, f, x.scalar_type()) : kw;
    at::Tensor g = grad_out.to(x.scalar_type());
    at::Tensor gx, gw, gb;
    if (!p.stride.empty()) {
      const int64_t cout = base.size(0);
      std::optional<std::vector<int64_t>> bias_sizes;
      if (need_bias) bias_sizes = std::vector<int64_t>{cout};
      std::tie(gx, gw, gb) = at::convolution_backward(
          g, x, w.defined() ? w : base.to(x.scalar_type()),
          need_bias ? at::OptionalIntArrayRef(*bias_sizes) : at::OptionalIntArrayRef(),
          p.stride, p.padding, p.dilation, false, {0, 0, 0}, 1, {need_x, true, need_bias});
    } else {
      at::Tensor g2 = g.reshape({-1, base.size(0)}), x2 = x.reshape({-1, base.size(1)});
      gw = g2.t().matmul(x2);
      if (need_x) gx = g.matmul(w);
      if (need_bias) gb = g2.sum(0);
    }
    at::Tensor gt = grad_gemm(p, gw, dtype).contiguous();
    places.bases[p.grad_t] = gt;
    places.offsets[p.grad_t] = 0;
    run(p.backward_table, places);
    if (!p.direct) flat = at::index_select(scratch, 0, p.unpack_index);
    if (flat.scalar_type() != cores[0].scalar_type()) flat = flat.to(cores[0].scalar_type());
    // Each core's gradient: one strided view of the flat buffer (one op, not narrow + view).
    int64_t pos = flat.storage_offset();
    for (int64_t i = 0; i < n; ++i) {
      out[6 + i] = flat.as_strided(cores[i].sizes(), dense_strides(cores[i].sizes()), pos);
      pos += cores[i].numel();
    }
    if (need_x) out[1] = gx.contiguous();
    if (need_bias) out[4] = gb.to(b.scalar_type());
    return out;
  }
};

at::Tensor merged_layer(const c10::intrusive_ptr<MergedPlan>& plan, const at::Tensor& x,
                        const at::Tensor& base, const std::optional<at::Tensor>& frozen,
                        const std::optional<at::Tensor>& bias, bool keep_weight,
                        const std::vector<at::Tensor>& cores) {
  TORCH_CHECK(static_cast<int64_t>(cores.size()) == plan->n_cores, "tenvoo_fast merged_layer: ",
              cores.size(), " cores for a plan of ", plan->n_cores);
  return MergedLayer::apply(plan, x, base, frozen, bias, keep_weight, at::TensorList(cores));
}

}  // namespace

void bind_merged_layer(pybind11::module& m) {
  namespace py = pybind11;
  py::class_<MergedPlan, c10::intrusive_ptr<MergedPlan>>(
      m, "MergedPlan", "What a merged layer's C++ steps need (tenvoo_fast/kernels/native_layer.py)")
      .def(py::init([]() { return c10::make_intrusive<MergedPlan>(); }))
      .def_readwrite("n_cores", &MergedPlan::n_cores)
      .def_readwrite("core_shapes", &MergedPlan::core_shapes)
      .def_readwrite("sum_axes", &MergedPlan::sum_axes)
      .def_readwrite("width", &MergedPlan::width)
      .def_readwrite("fwd_kind", &MergedPlan::fwd_kind)
      .def_readwrite("fwd_offset", &MergedPlan::fwd_offset)
      .def_readwrite("bwd_kind", &MergedPlan::bwd_kind)
      .def_readwrite("bwd_offset", &MergedPlan::bwd_offset)
      .def_readwrite("kept_numel", &MergedPlan::kept_numel)
      .def_readwrite("fwd_scratch_numel", &MergedPlan::fwd_scratch_numel)
      .def_readwrite("bwd_scratch_numel", &MergedPlan::bwd_scratch_numel)
      .def_readwrite("flat_numel", &MergedPlan::flat_numel)
      .def_readwrite("pack_table", &MergedPlan::pack_table)
      .def_readwrite("forward_table", &MergedPlan::forward_table)
      .def_readwrite("recompute_table", &MergedPlan::recompute_table)
      .def_readwrite("backward_table", &MergedPlan::backward_table)
      .def_readwrite("left", &MergedPlan::left)
      .def_readwrite("right", &MergedPlan::right)
      .def_readwrite("gemm", &MergedPlan::gemm)
      .def_readwrite("gemm_shape", &MergedPlan::gemm_shape)
      .def_readwrite("to_weight", &MergedPlan::to_weight)
      .def_readwrite("letters", &MergedPlan::letters)
      .def_readwrite("scale", &MergedPlan::scale)
      .def_readwrite("keeps_cores", &MergedPlan::keeps_cores)
      .def_readwrite("direct", &MergedPlan::direct)
      .def_readwrite("grad_t", &MergedPlan::grad_t)
      .def_readwrite("grad_as_weight", &MergedPlan::grad_as_weight)
      .def_readwrite("unpack_index", &MergedPlan::unpack_index)
      .def_readwrite("stride", &MergedPlan::stride)
      .def_readwrite("padding", &MergedPlan::padding)
      .def_readwrite("dilation", &MergedPlan::dilation)
      .def("check", &MergedPlan::check);
  m.def("merged_layer", &merged_layer,
        "A merged adapted conv3d / linear as one C++ autograd function (see csrc/merged_layer.cpp)",
        py::arg("plan"), py::arg("x"), py::arg("base"), py::arg("frozen"), py::arg("bias"),
        py::arg("keep_weight"), py::arg("cores"));
}

}  // namespace tenvoo_fast
