// CPU emulation of the fip_fast CUDA kernels, for tests only (tests/test_cuda_build.py builds it with g++ and loads
// it with ctypes).  It runs the *same* block bodies as the kernels (multi_tensor.cuh, compiled here as host code),
// looping over blocks and threads, with tables built by the same tables.h code as the binding.  What it checks
// without a GPU: the per-element arithmetic and its order, dtype conversions, the chunk lookup, the vector and
// scalar (misaligned / tail) paths, the found_inf skip and the device-scalar reads.  What it cannot check: the
// CUDA launch itself, warp-level reductions (emulated by summing thread partials in order), memory ordering.
//
//   g++ -std=c++17 -O1 -ffp-contract=off -Wno-unknown-pragmas -shared -fPIC -I<cuda>/include -o libfipemu.so emulate.cpp
#include <cmath>
#include <cstdint>
#include <vector>

#include "fip_fast_cuda.h"
#include "multi_tensor.cuh"
#include "tables.h"

using namespace fip_fast;

namespace {

struct Scalars {
  // Half of the DevScalars read through a pointer (the "device" path), half by value, chosen by ptr_mode.
  float store[8];
  DevScalar make(int slot, double v, bool by_ptr) {
    store[slot] = static_cast<float>(v);
    return by_ptr ? DevScalar{&store[slot], 0.0f} : DevScalar{nullptr, static_cast<float>(v)};
  }
};

}  // namespace

extern "C" {

int64_t fipemu_pick_chunk(int64_t total, int num_sms) { return pick_chunk(total, num_sms); }

// Returns a cudaError_t code (0 = success).
int fipemu_fisher_accumulate(int grad_dtype, int n, void** fisher, void** grads, const int64_t* numel,
                             int64_t chunk, int nthreads, double beta, double alpha, int ptr_mode) {
  std::vector<PairEntry> t;
  for (int i = 0; i < n; ++i)
    if (numel[i] > 0) t.push_back(PairEntry{fisher[i], grads[i], numel[i], 0});
  const int64_t nchunks = assign_chunks(t, chunk);
  Scalars s;
  const DevScalar b = s.make(0, beta, ptr_mode & 1), a = s.make(1, alpha, ptr_mode & 2);
  FIP_DISPATCH_DTYPE(static_cast<DType>(grad_dtype), G,
    for (int64_t blk = 0; blk < nchunks; ++blk)
      for (int th = 0; th < nthreads; ++th)
        detail::fisher_accumulate_block<G>(t.data(), static_cast<int>(t.size()), chunk, b, a, blk, th, nthreads))
  return 0;
}

int fipemu_perturb(int param_dtype, int grad_dtype, int n, void** params, void** grads, const int64_t* numel,
                   int64_t chunk, int nthreads, double scale, int has_found_inf, double found_inf, int ptr_mode) {
  std::vector<PairEntry> t;
  for (int i = 0; i < n; ++i)
    if (numel[i] > 0) t.push_back(PairEntry{params[i], grads[i], numel[i], 0});
  const int64_t nchunks = assign_chunks(t, chunk);
  Scalars s;
  const DevScalar sc = s.make(0, scale, ptr_mode & 1);
  s.store[7] = static_cast<float>(found_inf);
  const float* fi = has_found_inf ? &s.store[7] : nullptr;
  FIP_DISPATCH_DTYPE(static_cast<DType>(param_dtype), P, FIP_DISPATCH_DTYPE(static_cast<DType>(grad_dtype), G,
    for (int64_t blk = 0; blk < nchunks; ++blk)
      for (int th = 0; th < nthreads; ++th)
        detail::perturb_block<P, G>(t.data(), static_cast<int>(t.size()), chunk, sc, fi, blk, th, nthreads)))
  return 0;
}

// scal = [lr, mix, restore_scale, step, next_pert_scale, found_inf, momentum, weight_decay, eta_r, beta, damping]
// flags = [nesterov, has_grad_pert, has_restore, has_pert, precondition, has_found_inf, has_next_pert_scale]
// steps: nullptr (every tensor uses scal[3]) or n per-tensor fp32 step counts, read through StepEntry::step like the
// binding's per-parameter state["step"] pointers.
int fipemu_fip_step(int param_dtype, int grad_dtype, int anchor_dtype, int n, void** param, void** grad,
                    void** grad_pert, void** fisher0, void** anchor, void** mom, void** fisher, void** pert,
                    const int64_t* numel, int64_t chunk, int nthreads, const double* scal, const int* flags,
                    int ptr_mode, const float* steps) {
  StepArgs a{};
  Scalars s;
  a.lr = s.make(0, scal[0], ptr_mode & 1);
  a.mix = s.make(1, scal[1], ptr_mode & 2);
  a.restore_scale = s.make(2, scal[2], ptr_mode & 4);
  a.step = s.make(3, scal[3], ptr_mode & 8);
  a.next_pert_scale = flags[6] ? s.make(4, scal[4], ptr_mode & 16) : DevScalar{nullptr, 0.0f};
  s.store[7] = static_cast<float>(scal[5]);
  a.found_inf = flags[5] ? &s.store[7] : nullptr;
  a.momentum = static_cast<float>(scal[6]);
  a.weight_decay = static_cast<float>(scal[7]);
  a.eta_r = static_cast<float>(scal[8]);
  a.beta = static_cast<float>(scal[9]);
  a.one_minus_beta = static_cast<float>(1.0 - scal[9]);
  a.damping = static_cast<float>(scal[10]);
  a.nesterov = flags[0];
  a.has_grad_pert = flags[1];
  a.has_restore = flags[2];
  a.has_pert = flags[3];
  a.precondition = flags[4];
  std::vector<StepEntry> t;
  for (int i = 0; i < n; ++i) {
    if (numel[i] <= 0) continue;
    const bool anch = fisher0[i] != nullptr && a.eta_r != 0.0f;  // same rule as bindings.cpp
    t.push_back(StepEntry{param[i], grad[i], a.has_grad_pert ? grad_pert[i] : nullptr,
                          anch ? static_cast<const float*>(fisher0[i]) : nullptr, anch ? anchor[i] : nullptr,
                          static_cast<float*>(mom[i]), static_cast<float*>(fisher[i]),
                          a.has_pert ? static_cast<float*>(pert[i]) : nullptr, steps != nullptr ? &steps[i] : nullptr,
                          numel[i], 0});
  }
  const int64_t nchunks = assign_chunks(t, chunk);
  const int nt = static_cast<int>(t.size());
  const DType P_ = static_cast<DType>(param_dtype), G_ = static_cast<DType>(grad_dtype);
  if (anchor_dtype == kF32) {
    FIP_DISPATCH_DTYPE(P_, P, FIP_DISPATCH_DTYPE(G_, G,
      for (int64_t blk = 0; blk < nchunks; ++blk)
        for (int th = 0; th < nthreads; ++th)
          detail::fip_step_block<P, G, float>(t.data(), nt, chunk, a, blk, th, nthreads)))
  } else if (anchor_dtype == param_dtype && param_dtype != kF32) {
    FIP_DISPATCH_DTYPE(P_, P, FIP_DISPATCH_DTYPE(G_, G,
      for (int64_t blk = 0; blk < nchunks; ++blk)
        for (int th = 0; th < nthreads; ++th)
          detail::fip_step_block<P, G, P>(t.data(), nt, chunk, a, blk, th, nthreads)))
  } else {
    return cudaErrorInvalidValue;
  }
  return 0;
}

// out = [norm, found_inf]; tensors may mix dtypes (grouped like bindings.cpp: one stage-1 "launch" per dtype).
int fipemu_global_norm(int n, void** tensors, const int* dtypes, const int64_t* numel, int64_t chunk, int nthreads,
                       float* out) {
  std::vector<float> partials;
  for (int dt = kF32; dt <= kBF16; ++dt) {
    std::vector<NormEntry> t;
    for (int i = 0; i < n; ++i)
      if (dtypes[i] == dt && numel[i] > 0) t.push_back(NormEntry{tensors[i], numel[i], 0});
    if (t.empty()) continue;
    const int64_t nchunks = assign_chunks(t, chunk);
    FIP_DISPATCH_DTYPE(static_cast<DType>(dt), T,
      for (int64_t blk = 0; blk < nchunks; ++blk) {
        float acc = 0.0f;
        for (int th = 0; th < nthreads; ++th)
          acc += detail::l2norm_thread_sum<T>(t.data(), static_cast<int>(t.size()), chunk, blk, th, nthreads);
        partials.push_back(acc);
      })
  }
  // stage 2: the finalize kernel's block of kFinalizeThreads threads, each summing its stride of the partials
  double acc = 0.0;
  for (int th = 0; th < kFinalizeThreads; ++th)
    acc += detail::l2norm_finalize_thread_sum(partials.data(), static_cast<int64_t>(partials.size()), th,
                                              kFinalizeThreads);
  detail::l2norm_finalize_write(acc, &out[0], &out[1]);
  return 0;
}

}  // extern "C"
