// Launchers of the CUDA kernels (last_step_cuda.cu), free of torch so that nvcc compiles the
// kernels on their own (tenvoo-fast check-kernels); bind_cuda.cpp calls them from the ops.
#pragma once

#include <cuda_runtime.h>

#include "tenvoo_fast/layout.h"

namespace tenvoo_fast {
namespace cuda {

enum class DType : int { kFloat32 = 0, kFloat64 = 1, kBFloat16 = 2, kFloat16 = 3 };

//! out[off(b,m,n)] = fold(scale * sum_k a[b,m,k] b[b,k,n], frozen, base), cast to out_dtype.
//! ``base``/``frozen`` may be null (then out is scale*T in the contraction dtype ``acc``).
cudaError_t launch_build(const Step& step, DType acc, const void* a, const void* b,
                         DType base_dtype, const void* base, const void* frozen,
                         DType out_dtype, void* out, double scale, cudaStream_t stream);

//! ga = scale * G·bᵀ and gb = scale * aᵀ·G, G read in place through the groups' offsets.
cudaError_t launch_grads(const Step& step, DType acc, DType grad_dtype, const void* grad,
                         const void* a, const void* b, void* ga, void* gb, double scale,
                         cudaStream_t stream);

}  // namespace cuda
}  // namespace tenvoo_fast
