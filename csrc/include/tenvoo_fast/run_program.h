// The contraction program runner (csrc/run_program.cpp), for C++ callers: the fused merged
// layer (csrc/merged_layer.cpp) runs its forward and backward programs through these.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <optional>
#include <vector>

namespace tenvoo_fast {

// Runs a flattened program (records documented in run_program.cpp); bases[id] / offsets[id]:
// where tensor id lies. ``loops``: small CPU instructions as loops; ``watched``: a dispatch
// mode watches, so every instruction is also issued as its ATen call.
void run_program(const std::vector<at::Tensor>& bases, const std::vector<int64_t>& offsets,
                 const at::Tensor& table, bool loops, bool watched);

// at::bmm_out(out, a, b), as a loop when ``loops`` and small on the CPU.
void matmul_out(const at::Tensor& a, const at::Tensor& b, at::Tensor& out, bool loops,
                bool watched);

// out = base + (t - frozen) as one loop when small on the CPU; false: not done here.
bool fold_out(const at::Tensor& t, const std::optional<at::Tensor>& frozen,
              const at::Tensor& base, at::Tensor& out, bool loops, bool watched);

}  // namespace tenvoo_fast
