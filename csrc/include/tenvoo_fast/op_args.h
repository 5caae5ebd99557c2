// Argument checks and unpacking shared by the CPU and CUDA registrations of the native ops
// (torch-dependent; the kernels themselves see only raw pointers and tenvoo_fast::Groups).
#pragma once

#include <ATen/ATen.h>
#include <torch/library.h>

#include <optional>

#include "tenvoo_fast/layout.h"

namespace tenvoo_fast {

inline Step step_args(const at::Tensor& a, const at::Tensor& b, at::IntArrayRef layout,
                          const char* op) {
  TORCH_CHECK(a.dim() == 3 && b.dim() == 3, op, ": operands must be (B, M, K) and (B, K, N), got ",
              a.sizes(), " and ", b.sizes());
  TORCH_CHECK(a.size(0) == b.size(0) && a.size(2) == b.size(1), op,
              ": operand shapes do not chain: ", a.sizes(), " and ", b.sizes());
  TORCH_CHECK(a.scalar_type() == b.scalar_type() &&
                  (a.scalar_type() == at::kFloat || a.scalar_type() == at::kDouble),
              op, ": operands must both be float32 or float64 (the contraction dtype), got ",
              a.scalar_type(), " and ", b.scalar_type());
  TORCH_CHECK(a.is_contiguous() && b.is_contiguous(), op, ": operands must be contiguous");
  TORCH_CHECK(a.device() == b.device(), op, ": operands on different devices");
  Step s;
  s.B = a.size(0);
  s.M = a.size(1);
  s.N = b.size(2);
  s.K = a.size(2);
  TORCH_CHECK(parse_groups(layout.data(), static_cast<int64_t>(layout.size()), &s.groups), op,
              ": malformed layout ", layout);
  TORCH_CHECK(group_numel(s.groups.batch) == s.B && group_numel(s.groups.rows) == s.M &&
                  group_numel(s.groups.cols) == s.N,
              op, ": layout groups (", group_numel(s.groups.batch), ", ",
              group_numel(s.groups.rows), ", ", group_numel(s.groups.cols),
              ") do not match the operands' (B, M, N) = (", s.B, ", ", s.M, ", ", s.N, ")");
  return s;
}

inline void check_weight_sized(const at::Tensor& t, int64_t numel, const at::Tensor& a,
                               const char* what, const char* op) {
  TORCH_CHECK(t.numel() == numel, op, ": ", what, " has ", t.numel(), " elements, the weight ",
              numel);
  TORCH_CHECK(t.is_contiguous(), op, ": ", what, " must be contiguous");
  TORCH_CHECK(t.device() == a.device(), op, ": ", what, " is on ", t.device(),
              ", the operands on ", a.device());
}

//! The checks of last_step_build shared by every device: the operands, the layout, and the
//! weight-sized base, frozen and out tensors; returns the step.
inline Step build_args(const at::Tensor& a, const at::Tensor& b, at::IntArrayRef layout,
                       const std::optional<at::Tensor>& base,
                       const std::optional<at::Tensor>& frozen, const at::Tensor& out,
                       at::DeviceType device) {
  const char* op = "tenvoo_fast_C::last_step_build";
  const Step s = step_args(a, b, layout, op);
  TORCH_CHECK(a.device().type() == device, op, ": the ", device, " kernel was called with ",
              a.device(), " tensors");
  TORCH_CHECK(base.has_value() || !frozen.has_value(), op, ": frozen given without base");
  TORCH_CHECK(base.has_value() || out.scalar_type() == a.scalar_type(), op,
              ": without base the output is scale*T in the contraction dtype");
  check_weight_sized(out, s.B * s.M * s.N, a, "out", op);
  if (base) check_weight_sized(*base, out.numel(), a, "base", op);
  if (frozen) {
    check_weight_sized(*frozen, out.numel(), a, "frozen", op);
    TORCH_CHECK(frozen->scalar_type() == a.scalar_type(), op,
                ": frozen must be in the contraction dtype ", a.scalar_type());
  }
  return s;
}

//! The checks of last_step_grads shared by every device; returns the step.
inline Step grads_args(const at::Tensor& grad_weight, const at::Tensor& a, const at::Tensor& b,
                       at::IntArrayRef layout, at::DeviceType device) {
  const char* op = "tenvoo_fast_C::last_step_grads";
  const Step s = step_args(a, b, layout, op);
  TORCH_CHECK(a.device().type() == device, op, ": the ", device, " kernel was called with ",
              a.device(), " tensors");
  check_weight_sized(grad_weight, s.B * s.M * s.N, a, "grad_weight", op);
  return s;
}

}  // namespace tenvoo_fast
