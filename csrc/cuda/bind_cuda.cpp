// CUDA registrations of the native ops: checks, allocation, and the launch on torch's current
// stream; the kernels are in last_step_cuda.cu (compiled by nvcc, free of torch).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/extension.h>
#include <torch/library.h>

#include "last_step_cuda.cuh"
#include "tenvoo_fast/op_args.h"

namespace tenvoo_fast {
namespace {

cuda::DType dtype_of(at::ScalarType t, const char* op) {
  switch (t) {
    case at::kFloat: return cuda::DType::kFloat32;
    case at::kDouble: return cuda::DType::kFloat64;
    case at::kBFloat16: return cuda::DType::kBFloat16;
    case at::kHalf: return cuda::DType::kFloat16;
    default: TORCH_CHECK(false, op, ": unsupported dtype ", t);
  }
}

void check_launch(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, op, ": CUDA launch failed: ", cudaGetErrorString(err));
}

void build_cuda(const at::Tensor& a, const at::Tensor& b, at::IntArrayRef layout,
               const std::optional<at::Tensor>& base,
               const std::optional<at::Tensor>& frozen, double scale, at::Tensor& out) {
  const char* op = "tenvoo_fast_C::last_step_build";
  const Step s = build_args(a, b, layout, base, frozen, out, at::kCUDA);
  const bool effective = base.has_value();
  const at::ScalarType out_dtype = out.scalar_type();
  const c10::cuda::CUDAGuard guard(a.device());
  check_launch(cuda::launch_build(
                   s, dtype_of(a.scalar_type(), op), a.data_ptr(), b.data_ptr(),
                   dtype_of(effective ? base->scalar_type() : a.scalar_type(), op),
                   effective ? base->data_ptr() : nullptr, frozen ? frozen->data_ptr() : nullptr,
                   dtype_of(out_dtype, op), out.data_ptr(), scale,
                   c10::cuda::getCurrentCUDAStream()),
               op);
}

std::tuple<at::Tensor, at::Tensor> grads_cuda(const at::Tensor& grad_weight, const at::Tensor& a,
                                              const at::Tensor& b, at::IntArrayRef layout,
                                              double scale) {
  const Step s = grads_args(grad_weight, a, b, layout, at::kCUDA);
  const char* op = "tenvoo_fast_C::last_step_grads";
  const c10::cuda::CUDAGuard guard(a.device());
  at::Tensor ga = at::empty_like(a), gb = at::empty_like(b);
  check_launch(cuda::launch_grads(s, dtype_of(a.scalar_type(), op),
                                  dtype_of(grad_weight.scalar_type(), op), grad_weight.data_ptr(),
                                  a.data_ptr(), b.data_ptr(), ga.data_ptr(), gb.data_ptr(), scale,
                                  c10::cuda::getCurrentCUDAStream()),
               op);
  return {ga, gb};
}

}  // namespace

TORCH_LIBRARY_IMPL(tenvoo_fast_C, CUDA, m) {
  m.impl("last_step_build", &build_cuda);
  m.impl("last_step_grads", &grads_cuda);
}

}  // namespace tenvoo_fast

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  module.doc() = "tenvoo_fast CUDA kernels (registered under torch.ops.tenvoo_fast_C)";
}
