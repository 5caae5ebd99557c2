// Index arithmetic of the weight-sized contraction step, shared by the CPU and CUDA kernels.
//
// The last step of an adapter's contraction tree is a batched GEMM
//     T[b, m, n] = sum_k L[b, m, k] * R[b, k, n]
// whose (b, m, n) land in the weight at off_b(b) + off_m(m) + off_n(n): the weight's letters
// come from both operands, interleaved, so each of the batch, row and column groups is a
// mixed-radix number whose digits have their own strides in the weight (tenvoo_fast/last_step.py
// defines the groups; this header decodes them). Everything here is __host__ __device__ and
// free of torch, so the CTest executable checks it on its own.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define TF_HD __host__ __device__ __forceinline__
#else
#define TF_HD inline
#endif

namespace tenvoo_fast {

//! At most this many letters per group (TenVOO uses up to 5: A, B, C, y, z).
constexpr int kMaxLetters = 8;

//! One letter group: its letters' sizes and weight strides, outermost letter first.
struct Group {
  int32_t n = 0;
  int64_t size[kMaxLetters] = {};
  int64_t stride[kMaxLetters] = {};
};

//! The three groups of a last step: batch, rows (left operand only), columns (right only).
struct Groups {
  Group batch, rows, cols;
};

//! The GEMM view of a last step: operands L (B, M, K) and R (B, K, N), and the groups that
//! place its output in the weight.
struct Step {
  int64_t B = 0, M = 0, N = 0, K = 0;
  Groups groups;
};

//! Number of indices in a group (the product of its sizes; 1 for an empty group).
TF_HD int64_t group_numel(const Group& g) {
  int64_t n = 1;
  for (int i = 0; i < g.n; ++i) n *= g.size[i];
  return n;
}

//! Weight offset of index ``index`` of a group: its mixed-radix digits times their strides.
TF_HD int64_t group_offset(const Group& g, int64_t index) {
  int64_t off = 0;
  for (int i = g.n - 1; i >= 0; --i) {
    const int64_t digit = index % g.size[i];
    index /= g.size[i];
    off += digit * g.stride[i];
  }
  return off;
}

//! Length of the contiguous runs of a group: the product of its innermost letters' sizes for as
//! long as their strides are those of a contiguous block (1, then the sizes so far). Indices
//! i and i+1 within one run (i+1 not a multiple of the run) are adjacent in the weight, which
//! lets the kernels read and write whole runs with unit stride.
TF_HD int64_t contiguous_run(const Group& g) {
  int64_t run = 1;
  for (int i = g.n - 1; i >= 0 && g.stride[i] == run; --i) run *= g.size[i];
  return run;
}

//! Weight offset of element (b, m, n) of the GEMM's output.
TF_HD int64_t weight_offset(const Groups& gs, int64_t b, int64_t m, int64_t n) {
  return group_offset(gs.batch, b) + group_offset(gs.rows, m) + group_offset(gs.cols, n);
}

//! Parse the packed form ``[n, size_0.., stride_0..]`` x 3 (batch, rows, cols) that the Python
//! side passes; returns false (and leaves ``out`` unspecified) if it is malformed.
inline bool parse_groups(const int64_t* packed, int64_t length, Groups* out) {
  Group* groups[3] = {&out->batch, &out->rows, &out->cols};
  int64_t pos = 0;
  for (Group* g : groups) {
    if (pos >= length) return false;
    const int64_t n = packed[pos++];
    if (n < 0 || n > kMaxLetters || pos + 2 * n > length) return false;
    g->n = static_cast<int32_t>(n);
    for (int64_t i = 0; i < n; ++i) {
      g->size[i] = packed[pos + i];
      g->stride[i] = packed[pos + n + i];
      if (g->size[i] < 1 || g->stride[i] < 0) return false;
    }
    pos += 2 * n;
  }
  return pos == length;
}

//! The fused epilogue of the build, in the order every backend uses, so that the frozen-copy
//! layer reproduces its base layer exactly at initialisation (scale*T - T0 == 0 when θ = θ0):
//! ``base + (scale*acc - frozen)``. Compiled without FMA contraction (see CMakeLists/setup.py).
template <typename acc_t>
TF_HD acc_t fold(acc_t acc, acc_t scale, bool has_scale, bool has_frozen, acc_t frozen,
                 bool has_base, acc_t base) {
  acc_t v = has_scale ? acc * scale : acc;
  if (has_base) {
    if (has_frozen) v = v - frozen;
    v = v + base;
  }
  return v;
}

//! Ceiling division, for tile counts.
TF_HD int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace tenvoo_fast
