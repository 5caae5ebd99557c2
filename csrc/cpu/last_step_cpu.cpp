// CPU kernels of the native ops (C++, parallelised with ATen's OpenMP thread pool).
//
// last_step_build: tiles of the (B, M, N) output; each tile's GEMM (ATen's mm on views, in the
// contraction dtype) fills a thread-local buffer that stays in cache, then the fused epilogue
// (layout.h's fold) writes base + (scale*T - frozen) straight into the weight's layout, cast to
// the output dtype: the weight is written once, and no weight-sized temporary exists.
// last_step_grads: dL/dW is gathered tile by tile (read twice in all, never copied whole) and
// contracted into dL/da and dL/db by per-tile GEMMs.
// Built with -ffp-contract=off so the epilogue rounds exactly as the torch path does.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "tenvoo_fast/layout.h"
#include "tenvoo_fast/op_args.h"

namespace tenvoo_fast {
namespace {

constexpr int64_t kTileM = 64;
constexpr int64_t kTileN = 512;

// A (rows x cols) matrix over raw memory with a row stride, as a tensor view (no copy), so
// that each tile's GEMM runs in ATen's CPU BLAS; inside at::parallel_for it is single-threaded.
template <typename T>
at::Tensor matrix(const T* data, int64_t rows, int64_t cols, int64_t ld) {
  return at::from_blob(const_cast<T*>(data), {rows, cols}, {ld, 1},
                       at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value));
}

std::vector<int64_t> offsets(const Group& g) {
  std::vector<int64_t> off(group_numel(g));
  for (int64_t i = 0; i < static_cast<int64_t>(off.size()); ++i) off[i] = group_offset(g, i);
  return off;
}

// dst (rows x nt, row-major) = g at rows m0.. and columns n0.. of batch element bi, read in
// place through the groups' offsets, by contiguous runs of the columns.
template <typename acc_t, typename grad_t>
void gather_tile(const grad_t* g, int64_t om0, const int64_t* off_m, int64_t rows,
                 const int64_t* off_n, int64_t n0, int64_t nt, int64_t run, acc_t* dst) {
  for (int64_t i = 0; i < rows; ++i, dst += nt) {
    for (int64_t j = 0; j < nt;) {
      const int64_t len = std::min(nt - j, run - (n0 + j) % run);
      const grad_t* src = g + om0 + off_m[i] + off_n[j];
      for (int64_t q = 0; q < len; ++q) dst[j + q] = static_cast<acc_t>(src[q]);
      j += len;
    }
  }
}

template <typename acc_t, typename base_t, typename out_t>
void build_kernel(const Step& s, const acc_t* a, const acc_t* b, const base_t* base,
                  const acc_t* frozen, out_t* out, acc_t scale) {
  const auto off_b = offsets(s.groups.batch), off_m = offsets(s.groups.rows),
             off_n = offsets(s.groups.cols);
  const int64_t tiles_m = ceil_div(s.M, kTileM), tiles_n = ceil_div(s.N, kTileN);
  const bool has_scale = scale != acc_t(1);
  const int64_t run = contiguous_run(s.groups.cols);
  at::parallel_for(0, s.B * tiles_m * tiles_n, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> acc(kTileM * kTileN);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t bi = t / (tiles_m * tiles_n), r = t % (tiles_m * tiles_n);
      const int64_t m0 = (r / tiles_n) * kTileM, n0 = (r % tiles_n) * kTileN;
      const int64_t mt = std::min(kTileM, s.M - m0), nt = std::min(kTileN, s.N - n0);
      // acc (mt x nt) = a[bi, m0:m0+mt, :] @ b[bi, :, n0:n0+nt]
      at::Tensor tile = matrix(acc.data(), mt, nt, nt);
      at::mm_out(tile, matrix(a + (bi * s.M + m0) * s.K, mt, s.K, s.K),
                 matrix(b + bi * s.K * s.N + n0, s.K, nt, s.N));
      for (int64_t i = 0; i < mt; ++i) {
        const acc_t* row = acc.data() + i * nt;
        const int64_t om = off_b[bi] + off_m[m0 + i];
        // Column by contiguous run: unit-stride loads and stores the compiler vectorises.
        for (int64_t j = 0; j < nt;) {
          const int64_t len = std::min(nt - j, run - (n0 + j) % run);
          const int64_t o = om + off_n[n0 + j];
          out_t* dst = out + o;
          const acc_t* src = row + j;
          if (base == nullptr) {
            for (int64_t q = 0; q < len; ++q)
              dst[q] = static_cast<out_t>(has_scale ? src[q] * scale : src[q]);
          } else if (frozen == nullptr) {
            const base_t* w = base + o;
            for (int64_t q = 0; q < len; ++q)
              dst[q] = static_cast<out_t>((has_scale ? src[q] * scale : src[q]) +
                                          static_cast<acc_t>(w[q]));
          } else {
            const base_t* w = base + o;
            const acc_t* f = frozen + o;
            for (int64_t q = 0; q < len; ++q)
              dst[q] = static_cast<out_t>(
                  fold<acc_t>(src[q], scale, has_scale, true, f[q], true, static_cast<acc_t>(w[q])));
          }
          j += len;
        }
      }
    }
  });
}

template <typename acc_t, typename grad_t>
void grads_kernel(const Step& s, const grad_t* g, const acc_t* a, const acc_t* b,
                  acc_t* ga, acc_t* gb, acc_t scale) {
  const auto off_b = offsets(s.groups.batch), off_m = offsets(s.groups.rows),
             off_n = offsets(s.groups.cols);
  const bool has_scale = scale != acc_t(1);
  const int64_t run = contiguous_run(s.groups.cols);
  const int64_t tiles_m = ceil_div(s.M, kTileM), tiles_n = ceil_div(s.N, kTileN);
  // dL/da[b, m, k] = scale * sum_n G[b, m, n] b[b, k, n]: a tile of rows per task, so that b
  // streams through the cache once per tile rather than once per row.
  at::parallel_for(0, s.B * tiles_m, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> gt(kTileM * kTileN), part(kTileM * s.K);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t bi = t / tiles_m, m0 = (t % tiles_m) * kTileM;
      const int64_t mt = std::min(kTileM, s.M - m0);
      std::fill(part.begin(), part.end(), acc_t(0));
      for (int64_t n0 = 0; n0 < s.N; n0 += kTileN) {
        const int64_t nt = std::min(kTileN, s.N - n0);
        gather_tile(g, off_b[bi], off_m.data() + m0, mt, off_n.data() + n0, n0, nt, run,
                    gt.data());
        // part (mt x K) += g_tile (mt x nt) @ b[bi, :, n0:n0+nt]ᵀ
        matrix(part.data(), mt, s.K, s.K)
            .addmm_(matrix(gt.data(), mt, nt, nt), matrix(b + bi * s.K * s.N + n0, s.K, nt, s.N).t());
      }
      for (int64_t i = 0; i < mt; ++i)
        for (int64_t k = 0; k < s.K; ++k) {
          const acc_t v = part[i * s.K + k];
          ga[(bi * s.M + m0 + i) * s.K + k] = has_scale ? v * scale : v;
        }
    }
  });
  // dL/db[b, k, n] = scale * sum_m a[b, m, k] G[b, m, n]: a tile of columns per task.
  at::parallel_for(0, s.B * tiles_n, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> acc(s.K * kTileN), gt(kTileM * kTileN);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t bi = t / tiles_n, n0 = (t % tiles_n) * kTileN;
      const int64_t nt = std::min(kTileN, s.N - n0);
      std::fill(acc.begin(), acc.end(), acc_t(0));
      for (int64_t m0 = 0; m0 < s.M; m0 += kTileM) {
        const int64_t mc = std::min(kTileM, s.M - m0);
        gather_tile(g, off_b[bi], off_m.data() + m0, mc, off_n.data() + n0, n0, nt, run,
                    gt.data());
        // acc (K x nt) += a[bi, m0:m0+mc, :]ᵀ @ g_tile (mc x nt)
        matrix(acc.data(), s.K, nt, nt)
            .addmm_(matrix(a + (bi * s.M + m0) * s.K, mc, s.K, s.K).t(),
                    matrix(gt.data(), mc, nt, nt));
      }
      for (int64_t k = 0; k < s.K; ++k)
        for (int64_t j = 0; j < nt; ++j) {
          const acc_t v = acc[k * nt + j];
          gb[(bi * s.K + k) * s.N + n0 + j] = has_scale ? v * scale : v;
        }
    }
  });
}

void build_cpu(const at::Tensor& a, const at::Tensor& b, at::IntArrayRef layout,
              const std::optional<at::Tensor>& base,
              const std::optional<at::Tensor>& frozen, double scale, at::Tensor& out) {
  const Step s = build_args(a, b, layout, base, frozen, out, at::kCPU);
  const bool effective = base.has_value();
  const at::ScalarType out_dtype = out.scalar_type();
  const at::ScalarType base_dtype = effective ? base->scalar_type() : a.scalar_type();
  AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "last_step_build_cpu", [&] {
    using acc_t = scalar_t;
    const acc_t* frozen_p = frozen ? frozen->data_ptr<acc_t>() : nullptr;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, base_dtype, "base", [&] {
      using base_t = scalar_t;
      const base_t* base_p = effective ? base->data_ptr<base_t>() : nullptr;
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, out_dtype, "out", [&] {
        build_kernel<acc_t, base_t, scalar_t>(s, a.data_ptr<acc_t>(), b.data_ptr<acc_t>(),
                                              base_p, frozen_p, out.data_ptr<scalar_t>(),
                                              static_cast<acc_t>(scale));
      });
    });
  });
}

std::tuple<at::Tensor, at::Tensor> grads_cpu(const at::Tensor& grad_weight, const at::Tensor& a,
                                             const at::Tensor& b, at::IntArrayRef layout,
                                             double scale) {
  const Step s = grads_args(grad_weight, a, b, layout, at::kCPU);
  at::Tensor ga = at::empty_like(a), gb = at::empty_like(b);
  AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "last_step_grads_cpu", [&] {
    using acc_t = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, grad_weight.scalar_type(), "grad",
                                    [&] {
      grads_kernel<acc_t, scalar_t>(s, grad_weight.data_ptr<scalar_t>(), a.data_ptr<acc_t>(),
                                    b.data_ptr<acc_t>(), ga.data_ptr<acc_t>(),
                                    gb.data_ptr<acc_t>(), static_cast<acc_t>(scale));
    });
  });
  return {ga, gb};
}

}  // namespace

TORCH_LIBRARY_IMPL(tenvoo_fast_C, CPU, m) {
  m.impl("last_step_build", &build_cpu);
  m.impl("last_step_grads", &grads_cpu);
}

}  // namespace tenvoo_fast
