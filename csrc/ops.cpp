// The native ops' schemas (one definition; per-device kernels register under CPU and CUDA) and
// the Python module that loading them needs. The ops are the weight-sized step of an adapter's
// contraction (tenvoo_fast/last_step.py has the same two functions in torch):
//   last_step_build: out[off(b,m,n)] = base + (scale*T - frozen), T = a @ b, cast to out's dtype
//                    (base and frozen absent: scale*T in the contraction dtype); ``out`` is the
//                    caller's (a reused scratch buffer on the CPU), written, never read;
//   last_step_grads: dL/da and dL/db of <grad_weight, scale*T>, reading grad_weight in place.
// The module also binds run_program (run_program.cpp), a plain function, not an op: its ATen
// calls reach the dispatcher one by one.
#include <torch/extension.h>
#include <torch/library.h>

TORCH_LIBRARY(tenvoo_fast_C, m) {
  m.def(
      "last_step_build(Tensor a, Tensor b, int[] layout, Tensor? base, Tensor? frozen, "
      "float scale, Tensor(a!) out) -> ()");
  m.def(
      "last_step_grads(Tensor grad_weight, Tensor a, Tensor b, int[] layout, float scale) "
      "-> (Tensor, Tensor)");
}

namespace tenvoo_fast {
void bind_run_program(pybind11::module& m);  // run_program.cpp
void bind_merged_layer(pybind11::module& m);  // merged_layer.cpp
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  module.doc() = "tenvoo_fast native kernels (ops under torch.ops.tenvoo_fast_C) and the "
                 "contraction program runner (run_program)";
  tenvoo_fast::bind_run_program(module);
  tenvoo_fast::bind_merged_layer(module);
}
