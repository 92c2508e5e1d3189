// fip_fast multi-tensor L2 norm (two stages, deterministic: no atomics) and the non-finite flag.
// CUDA headers only (no torch): `nvcc -arch=sm_90 -cubin l2norm.cu` compile-checks this file in CI.
#include <cuda_runtime.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>

#include "fip_fast_cuda.h"
#include "multi_tensor.cuh"
#include "tables.h"

namespace fip_fast {
namespace {

template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
  return v;
}

// Sum over the block, valid in thread 0.  blockDim.x is a multiple of 32, at most 1024.
template <typename T>
__device__ __forceinline__ T block_sum(T v) {
  __shared__ T warp_partials[32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  v = warp_sum(v);
  if (lane == 0) warp_partials[warp] = v;
  __syncthreads();
  v = threadIdx.x < nwarps ? warp_partials[threadIdx.x] : T(0);
  if (warp == 0) v = warp_sum(v);
  return v;
}

template <typename T>
__global__ void __launch_bounds__(kThreadsPerBlock)
l2norm_partials_kernel(const NormEntry* __restrict__ table, int ntensors, int64_t chunk, float* partials) {
  float acc = detail::l2norm_thread_sum<T>(table, ntensors, chunk, blockIdx.x, threadIdx.x, blockDim.x);
  acc = block_sum(acc);
  if (threadIdx.x == 0) partials[blockIdx.x] = acc;
}

__global__ void __launch_bounds__(kFinalizeThreads)
l2norm_finalize_kernel(const float* __restrict__ partials, int64_t n, float* out_norm, float* out_found_inf) {
  double acc = detail::l2norm_finalize_thread_sum(partials, n, threadIdx.x, blockDim.x);
  acc = block_sum(acc);
  if (threadIdx.x == 0) detail::l2norm_finalize_write(acc, out_norm, out_found_inf);
}

}  // namespace

cudaError_t launch_l2norm_partials(DType src, const NormEntry* table, int ntensors, int64_t nchunks, int64_t chunk,
                                   float* partials, cudaStream_t stream) {
  if (ntensors == 0 && nchunks == 0) return cudaSuccess;
  if (ntensors < 1 || nchunks < 1 || nchunks > 0x7fffffffLL || chunk < 4 || chunk % 4 != 0)
    return cudaErrorInvalidValue;
  const dim3 grid(static_cast<unsigned>(nchunks)), block(kThreadsPerBlock);
  FIP_DISPATCH_DTYPE(src, T,
      l2norm_partials_kernel<T><<<grid, block, 0, stream>>>(table, ntensors, chunk, partials))
  return cudaGetLastError();
}

cudaError_t launch_l2norm_finalize(const float* partials, int64_t n_partials, float* out_norm, float* out_found_inf,
                                   cudaStream_t stream) {
  if (n_partials < 0) return cudaErrorInvalidValue;
  l2norm_finalize_kernel<<<1, kFinalizeThreads, 0, stream>>>(partials, n_partials, out_norm, out_found_inf);
  return cudaGetLastError();
}

}  // namespace fip_fast
