// fip_fast CUDA kernels: the plain C++ interface between the kernel files (*.cu, CUDA headers only) and the
// torch binding (bindings.cpp).  No torch, no CUDA device code here: this header is also compiled by g++ for the
// CPU emulation test (csrc/emulate.cpp, tests/test_cuda_build.py).
//
// Multi-tensor apply
// ------------------
// Every launcher takes a *tensor table* in device memory: one Entry per non-empty tensor of the call, holding the
// raw pointers of that tensor in every list (parameter, gradient, state, ...), its element count and
// ``chunk_start``, the index of its first chunk.  Tensor i is split into ceil(numel_i / chunk) chunks of ``chunk``
// elements; chunks are numbered consecutively over the whole table (see tables.h) and CUDA block b processes
// chunk b: it finds its tensor by binary search over ``chunk_start`` (no per-chunk table, so the table's size does
// not grow with the model), then walks the chunk with 16-byte (fp32) / 8-byte (fp16, bf16) vector loads when all of
// that tensor's pointers are aligned, scalar loads otherwise.  One launch covers every tensor of one dtype
// combination; indexing is int64 throughout.
//
// Scalars that the optimizer keeps on the device (lr, mix, scales, step, found_inf) are DevScalar: the kernel reads
// ``*ptr`` when ``ptr`` is non-null (no host synchronisation), ``value`` otherwise.
#pragma once

#include <cstdint>
#include <cuda_runtime_api.h>

namespace fip_fast {

enum DType : int { kF32 = 0, kF16 = 1, kBF16 = 2 };

struct DevScalar {
  const float* ptr;  // device pointer to one fp32 value, or nullptr
  float value;       // used when ptr == nullptr
};

// fisher_accumulate_ (dst = fisher, fp32; src = grad) and perturb_ (dst = param; src = grad).
struct PairEntry {
  void* dst;
  const void* src;
  int64_t numel;
  int64_t chunk_start;
};

// global_norm
struct NormEntry {
  const void* src;
  int64_t numel;
  int64_t chunk_start;
};

// fip_step_: param (P), grad and grad_pert (G), fisher0 (fp32), anchor (A = fp32 or P), momentum / fisher / pert
// (fp32 state).  grad_pert, pert: nullptr when the call has none (then for every entry).  fisher0, anchor: nullptr for
// tensors without a CDA anchor (per entry; both or neither).  step: device pointer to this tensor's own fp32 step count
// (its optimizer state["step"]) for the bias correction 1 - beta^step, or nullptr to use StepArgs::step.
struct StepEntry {
  void* param;
  const void* grad;
  const void* grad_pert;
  const float* fisher0;
  const void* anchor;
  float* momentum;
  float* fisher;
  float* pert;
  const float* step;
  int64_t numel;
  int64_t chunk_start;
};

struct StepArgs {
  DevScalar lr;
  DevScalar mix;              // read only when has_grad_pert
  DevScalar restore_scale;    // read only when has_restore
  DevScalar step;             // read only when precondition, for entries whose StepEntry::step is nullptr
  DevScalar next_pert_scale;  // read only when has_pert (pass {nullptr, 0} for "None")
  const float* found_inf;     // device flag, nullable: non-zero (or NaN) => the kernel writes nothing
  float momentum;
  float weight_decay;
  float eta_r;
  float beta;                 // (float) beta
  float one_minus_beta;       // (float) (1.0 - beta), computed in double like the reference
  float damping;
  bool nesterov;
  bool has_grad_pert;
  bool has_restore;           // fd restore theta -= restore_scale * g (ignored when has_pert)
  bool has_pert;              // lagged estimator: theta -= pert; ...; pert = nps * g (stored only, not added to theta)
  bool precondition;
};

// The launchers return the launch status (cudaGetLastError() right after the launch; cudaSuccess for an empty
// call).  ``table`` is a device pointer to ``ntensors`` entries whose chunks number ``nchunks`` in total
// (1 <= nchunks < 2^31); ``chunk`` is a positive multiple of 4.
cudaError_t launch_fisher_accumulate(DType grad, const PairEntry* table, int ntensors, int64_t nchunks,
                                     int64_t chunk, DevScalar beta, DevScalar alpha, cudaStream_t stream);

cudaError_t launch_perturb(DType param, DType grad, const PairEntry* table, int ntensors, int64_t nchunks,
                           int64_t chunk, DevScalar scale, const float* found_inf, cudaStream_t stream);

// anchor must be kF32 or equal to param.
cudaError_t launch_fip_step(DType param, DType grad, DType anchor, const StepEntry* table, int ntensors,
                            int64_t nchunks, int64_t chunk, const StepArgs& args, cudaStream_t stream);

// Stage 1: partials[b] = fp32 sum of squares of chunk b.  Stage 2 (one block of kFinalizeThreads threads, each summing
// partials thread, thread + kFinalizeThreads, ... -- all n_partials of them): out_norm = sqrt(sum partials)
// (sum in double, cast to fp32 before the square root, so a squared norm that overflows fp32 gives inf), and
// out_found_inf = 1.0 if the norm is not finite else 0.0.  n_partials may be 0.
cudaError_t launch_l2norm_partials(DType src, const NormEntry* table, int ntensors, int64_t nchunks, int64_t chunk,
                                   float* partials, cudaStream_t stream);
cudaError_t launch_l2norm_finalize(const float* partials, int64_t n_partials, float* out_norm, float* out_found_inf,
                                   cudaStream_t stream);

}  // namespace fip_fast
