// CUDA kernels of the native ops. The index arithmetic (layout.h's group_offset) and the fused
// epilogue (fold) are the same functions the CPU kernels use. Accumulation in the contraction
// dtype (fp32, or fp64); compiled with --fmad=false so that scale*T - T0 is exactly zero at
// initialisation, as on every other path.
//
// build: one thread per output column n and kRowsPerBlock rows, the K-loop reading the small
// operands through the cache; the weight is written once, in its own layout and dtype.
// grad_left: one block per (b, m), a deterministic shared-memory reduction over n per k.
// grad_right: one thread per (b, k, n), summing over m.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "last_step_cuda.cuh"

namespace tenvoo_fast {
namespace cuda {
namespace {

constexpr int kThreads = 128;
constexpr int kRowsPerBlock = 4;
constexpr int kReduceThreads = 256;

template <typename T> struct Convert {
  template <typename A> __device__ static T from(A v) { return static_cast<T>(v); }
  template <typename A> __device__ static A to(T v) { return static_cast<A>(v); }
};
template <> struct Convert<__nv_bfloat16> {
  template <typename A> __device__ static __nv_bfloat16 from(A v) {
    return __float2bfloat16_rn(static_cast<float>(v));
  }
  template <typename A> __device__ static A to(__nv_bfloat16 v) {
    return static_cast<A>(__bfloat162float(v));
  }
};
template <> struct Convert<__half> {
  template <typename A> __device__ static __half from(A v) {
    return __float2half_rn(static_cast<float>(v));
  }
  template <typename A> __device__ static A to(__half v) { return static_cast<A>(__half2float(v)); }
};

template <typename acc_t, typename base_t, typename out_t>
__global__ void build_kernel(Step s, const acc_t* __restrict__ a, const acc_t* __restrict__ b,
                             const base_t* __restrict__ base, const acc_t* __restrict__ frozen,
                             out_t* __restrict__ out, acc_t scale, bool has_scale) {
  const int64_t n = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  const int64_t bi = blockIdx.z;
  if (n >= s.N) return;
  const int64_t off_bn = group_offset(s.groups.batch, bi) + group_offset(s.groups.cols, n);
  const acc_t* bcol = b + bi * s.K * s.N + n;
  for (int r = 0; r < kRowsPerBlock; ++r) {
    const int64_t m = static_cast<int64_t>(blockIdx.y) * kRowsPerBlock + r;
    if (m >= s.M) return;
    const acc_t* arow = a + (bi * s.M + m) * s.K;
    acc_t acc = 0;
    for (int64_t k = 0; k < s.K; ++k) acc += arow[k] * bcol[k * s.N];
    const int64_t o = off_bn + group_offset(s.groups.rows, m);
    const acc_t v = fold<acc_t>(acc, scale, has_scale, frozen != nullptr,
                                frozen ? frozen[o] : acc_t(0), base != nullptr,
                                base ? Convert<base_t>::template to<acc_t>(base[o]) : acc_t(0));
    out[o] = Convert<out_t>::from(v);
  }
}

template <typename acc_t, typename grad_t>
__global__ void grad_left_kernel(Step s, const grad_t* __restrict__ g,
                                 const acc_t* __restrict__ b, acc_t* __restrict__ ga,
                                 acc_t scale, bool has_scale) {
  __shared__ acc_t part[kReduceThreads];
  const int64_t m = blockIdx.x, bi = blockIdx.y;
  const int64_t off_bm = group_offset(s.groups.batch, bi) + group_offset(s.groups.rows, m);
  for (int64_t k = 0; k < s.K; ++k) {
    const acc_t* brow = b + (bi * s.K + k) * s.N;
    acc_t acc = 0;
    for (int64_t n = threadIdx.x; n < s.N; n += kReduceThreads)
      acc += Convert<grad_t>::template to<acc_t>(g[off_bm + group_offset(s.groups.cols, n)]) *
             brow[n];
    part[threadIdx.x] = acc;
    __syncthreads();
    for (int width = kReduceThreads / 2; width > 0; width /= 2) {
      if (threadIdx.x < width) part[threadIdx.x] += part[threadIdx.x + width];
      __syncthreads();
    }
    if (threadIdx.x == 0) ga[(bi * s.M + m) * s.K + k] = has_scale ? part[0] * scale : part[0];
    __syncthreads();
  }
}

template <typename acc_t, typename grad_t>
__global__ void grad_right_kernel(Step s, const grad_t* __restrict__ g,
                                  const acc_t* __restrict__ a, acc_t* __restrict__ gb,
                                  acc_t scale, bool has_scale) {
  const int64_t n = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  const int64_t k = blockIdx.y, bi = blockIdx.z;
  if (n >= s.N) return;
  const int64_t off_bn = group_offset(s.groups.batch, bi) + group_offset(s.groups.cols, n);
  acc_t acc = 0;
  for (int64_t m = 0; m < s.M; ++m)
    acc += a[(bi * s.M + m) * s.K + k] *
           Convert<grad_t>::template to<acc_t>(g[off_bn + group_offset(s.groups.rows, m)]);
  gb[(bi * s.K + k) * s.N + n] = has_scale ? acc * scale : acc;
}

// Calls f with a value of the C++ type that ``d`` names.
template <typename F> cudaError_t with_float_type(DType d, F&& f) {
  switch (d) {
    case DType::kFloat32: return f(float{});
    case DType::kFloat64: return f(double{});
    default: return cudaErrorInvalidValue;
  }
}
template <typename F> cudaError_t with_any_type(DType d, F&& f) {
  switch (d) {
    case DType::kFloat32: return f(float{});
    case DType::kFloat64: return f(double{});
    case DType::kBFloat16: return f(__nv_bfloat16{});
    case DType::kFloat16: return f(__half{});
  }
  return cudaErrorInvalidValue;
}

}  // namespace

cudaError_t launch_build(const Step& step, DType acc, const void* a, const void* b,
                         DType base_dtype, const void* base, const void* frozen,
                         DType out_dtype, void* out, double scale, cudaStream_t stream) {
  if (step.N == 0 || step.M == 0 || step.B == 0) return cudaSuccess;
  const dim3 grid(static_cast<unsigned>(ceil_div(step.N, kThreads)),
                  static_cast<unsigned>(ceil_div(step.M, kRowsPerBlock)),
                  static_cast<unsigned>(step.B));
  return with_float_type(acc, [&](auto acc_v) {
    using acc_t = decltype(acc_v);
    return with_any_type(base_dtype, [&](auto base_v) {
      using base_t = decltype(base_v);
      return with_any_type(out_dtype, [&](auto out_v) {
        using out_t = decltype(out_v);
        build_kernel<acc_t, base_t, out_t><<<grid, kThreads, 0, stream>>>(
            step, static_cast<const acc_t*>(a), static_cast<const acc_t*>(b),
            static_cast<const base_t*>(base), static_cast<const acc_t*>(frozen),
            static_cast<out_t*>(out), static_cast<acc_t>(scale), scale != 1.0);
        return cudaGetLastError();
      });
    });
  });
}

cudaError_t launch_grads(const Step& step, DType acc, DType grad_dtype, const void* grad,
                         const void* a, const void* b, void* ga, void* gb, double scale,
                         cudaStream_t stream) {
  if (step.N == 0 || step.M == 0 || step.B == 0 || step.K == 0) return cudaSuccess;
  return with_float_type(acc, [&](auto acc_v) {
    using acc_t = decltype(acc_v);
    return with_any_type(grad_dtype, [&](auto grad_v) {
      using grad_t = decltype(grad_v);
      const acc_t sc = static_cast<acc_t>(scale);
      const bool has_scale = scale != 1.0;
      grad_left_kernel<acc_t, grad_t>
          <<<dim3(static_cast<unsigned>(step.M), static_cast<unsigned>(step.B)), kReduceThreads,
             0, stream>>>(step, static_cast<const grad_t*>(grad), static_cast<const acc_t*>(b),
                          static_cast<acc_t*>(ga), sc, has_scale);
      cudaError_t err = cudaGetLastError();
      if (err != cudaSuccess) return err;
      const dim3 grid(static_cast<unsigned>(ceil_div(step.N, kThreads)),
                      static_cast<unsigned>(step.K), static_cast<unsigned>(step.B));
      grad_right_kernel<acc_t, grad_t><<<grid, kThreads, 0, stream>>>(
          step, static_cast<const grad_t*>(grad), static_cast<const acc_t*>(a),
          static_cast<acc_t*>(gb), sc, has_scale);
      return cudaGetLastError();
    });
  });
}

}  // namespace cuda
}  // namespace tenvoo_fast
