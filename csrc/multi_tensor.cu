// fip_fast multi-tensor elementwise kernels: fisher_accumulate_, perturb_, fip_step_.
// CUDA headers only (no torch): `nvcc -arch=sm_90 -cubin multi_tensor.cu` compile-checks this file in CI.
// The arithmetic lives in multi_tensor.cuh (shared with the CPU emulation test); see fip_fast_cuda.h for the tables.
#include <cuda_runtime.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>

#include "fip_fast_cuda.h"
#include "multi_tensor.cuh"
#include "tables.h"

namespace fip_fast {
namespace {

template <typename G>
__global__ void __launch_bounds__(kThreadsPerBlock)
fisher_accumulate_kernel(const PairEntry* __restrict__ table, int ntensors, int64_t chunk, DevScalar beta,
                         DevScalar alpha) {
  detail::fisher_accumulate_block<G>(table, ntensors, chunk, beta, alpha, blockIdx.x, threadIdx.x, blockDim.x);
}

template <typename P, typename G>
__global__ void __launch_bounds__(kThreadsPerBlock)
perturb_kernel(const PairEntry* __restrict__ table, int ntensors, int64_t chunk, DevScalar scale,
               const float* found_inf) {
  detail::perturb_block<P, G>(table, ntensors, chunk, scale, found_inf, blockIdx.x, threadIdx.x, blockDim.x);
}

// ptxas (sm_90, nvcc 13.0): 73-76 registers, no spills => 3 resident blocks (768 threads) per SM; with up to eight
// independent vector loads per thread that is far more bytes in flight than HBM needs.  A min-blocks bound of 3 or 4
// made ptxas spill, so none is given.
template <typename P, typename G, typename A>
__global__ void __launch_bounds__(kThreadsPerBlock)
fip_step_kernel(const StepEntry* __restrict__ table, int ntensors, int64_t chunk, StepArgs args) {
  detail::fip_step_block<P, G, A>(table, ntensors, chunk, args, blockIdx.x, threadIdx.x, blockDim.x);
}

bool bad_grid(int ntensors, int64_t nchunks, int64_t chunk) {
  return ntensors < 1 || nchunks < 1 || nchunks > 0x7fffffffLL || chunk < 4 || chunk % 4 != 0;
}

}  // namespace

cudaError_t launch_fisher_accumulate(DType grad, const PairEntry* table, int ntensors, int64_t nchunks,
                                     int64_t chunk, DevScalar beta, DevScalar alpha, cudaStream_t stream) {
  if (ntensors == 0 && nchunks == 0) return cudaSuccess;
  if (bad_grid(ntensors, nchunks, chunk)) return cudaErrorInvalidValue;
  const dim3 grid(static_cast<unsigned>(nchunks)), block(kThreadsPerBlock);
  FIP_DISPATCH_DTYPE(grad, G,
      fisher_accumulate_kernel<G><<<grid, block, 0, stream>>>(table, ntensors, chunk, beta, alpha))
  return cudaGetLastError();
}

cudaError_t launch_perturb(DType param, DType grad, const PairEntry* table, int ntensors, int64_t nchunks,
                           int64_t chunk, DevScalar scale, const float* found_inf, cudaStream_t stream) {
  if (ntensors == 0 && nchunks == 0) return cudaSuccess;
  if (bad_grid(ntensors, nchunks, chunk)) return cudaErrorInvalidValue;
  const dim3 grid(static_cast<unsigned>(nchunks)), block(kThreadsPerBlock);
  FIP_DISPATCH_DTYPE(param, P, FIP_DISPATCH_DTYPE(grad, G,
      perturb_kernel<P, G><<<grid, block, 0, stream>>>(table, ntensors, chunk, scale, found_inf)))
  return cudaGetLastError();
}

cudaError_t launch_fip_step(DType param, DType grad, DType anchor, const StepEntry* table, int ntensors,
                            int64_t nchunks, int64_t chunk, const StepArgs& args, cudaStream_t stream) {
  if (ntensors == 0 && nchunks == 0) return cudaSuccess;
  if (bad_grid(ntensors, nchunks, chunk)) return cudaErrorInvalidValue;
  const dim3 grid(static_cast<unsigned>(nchunks)), block(kThreadsPerBlock);
  if (anchor == kF32) {
    FIP_DISPATCH_DTYPE(param, P, FIP_DISPATCH_DTYPE(grad, G,
        fip_step_kernel<P, G, float><<<grid, block, 0, stream>>>(table, ntensors, chunk, args)))
  } else if (anchor == param && param != kF32) {
    // anchor stored in the parameter dtype (fp16 / bf16)
    FIP_DISPATCH_DTYPE(param, P, FIP_DISPATCH_DTYPE(grad, G,
        fip_step_kernel<P, G, P><<<grid, block, 0, stream>>>(table, ntensors, chunk, args)))
  } else {
    return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

}  // namespace fip_fast
