// Device code of the fip_fast multi-tensor kernels, written as __host__ __device__ "block bodies" so that the very
// same code runs (a) inside the __global__ kernels of multi_tensor.cu / l2norm.cu and (b) on the CPU in the
// emulation test (csrc/emulate.cpp loops over blocks and threads), which is how the arithmetic, the chunk lookup,
// the vector/scalar paths and the found_inf skip are checked against fip_fast.reference without a GPU.
//
// Only CUDA headers.  All arithmetic in fp32, results rounded to the storage dtype with round-to-nearest-even.
#pragma once

#include <cuda_runtime.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>

#include <cmath>
#include <cstdint>

#include "fip_fast_cuda.h"

#define FIP_HD __host__ __device__ __forceinline__

namespace fip_fast {
namespace detail {

constexpr int kVec = 4;  // elements per vector access: 16 bytes of fp32, 8 bytes of fp16 / bf16

FIP_HD float to_f(float x) { return x; }
FIP_HD float to_f(__half x) { return __half2float(x); }
FIP_HD float to_f(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T> FIP_HD T from_f(float x);
template <> FIP_HD float from_f<float>(float x) { return x; }
template <> FIP_HD __half from_f<__half>(float x) { return __float2half_rn(x); }
template <> FIP_HD __nv_bfloat16 from_f<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

template <typename T>
struct alignas(sizeof(T) * kVec) Vec {
  T v[kVec];
};

template <typename T>
FIP_HD bool is_aligned(const void* p) {
  return p == nullptr || (reinterpret_cast<uintptr_t>(p) % (sizeof(T) * kVec)) == 0;
}

// r[k] = p[k] for k < n (0 beyond); one vector load when vec (then n == kVec and p is aligned).
template <typename T>
FIP_HD void load(const void* base, int64_t i, int n, bool vec, float (&r)[kVec]) {
  const T* p = static_cast<const T*>(base) + i;
  if (vec) {
    const Vec<T> v = *reinterpret_cast<const Vec<T>*>(p);
#pragma unroll
    for (int k = 0; k < kVec; ++k) r[k] = to_f(v.v[k]);
  } else {
#pragma unroll
    for (int k = 0; k < kVec; ++k) r[k] = k < n ? to_f(p[k]) : 0.0f;
  }
}

template <typename T>
FIP_HD void store(void* base, int64_t i, int n, bool vec, const float (&r)[kVec]) {
  T* p = static_cast<T*>(base) + i;
  if (vec) {
    Vec<T> v;
#pragma unroll
    for (int k = 0; k < kVec; ++k) v.v[k] = from_f<T>(r[k]);
    *reinterpret_cast<Vec<T>*>(p) = v;
  } else {
#pragma unroll
    for (int k = 0; k < kVec; ++k)
      if (k < n) p[k] = from_f<T>(r[k]);
  }
}

FIP_HD float read(const DevScalar& s) { return s.ptr != nullptr ? *s.ptr : s.value; }

FIP_HD bool skip_step(const float* found_inf) {
  // NaN != 0 is true: a NaN flag skips too (like the reference's `found_inf != 0`).
  return found_inf != nullptr && *found_inf != 0.0f;
}

// Index of the table entry that owns global chunk ``chunk_id``: the last entry with chunk_start <= chunk_id.
template <typename Entry>
FIP_HD int find_tensor(const Entry* table, int ntensors, int64_t chunk_id) {
  int lo = 0, hi = ntensors - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) >> 1;
    if (table[mid].chunk_start <= chunk_id) lo = mid; else hi = mid - 1;
  }
  return lo;
}

// The part of tensor ``e`` that chunk ``chunk_id`` covers: elements [start, start + len).
struct Span {
  int64_t start;
  int64_t len;
};

template <typename Entry>
FIP_HD Span chunk_span(const Entry& e, int64_t chunk_id, int64_t chunk) {
  Span s;
  s.start = (chunk_id - e.chunk_start) * chunk;
  const int64_t rest = e.numel - s.start;
  s.len = rest < chunk ? rest : chunk;
  return s;
}

// ------------------------------------------------------------------------------------------------------------------
// Block bodies: block ``block`` of ``nthreads`` threads, this is thread ``thread``.
// ------------------------------------------------------------------------------------------------------------------

// F <- beta * F + alpha * g^2   (reference: b * f + a * g.pow(2))
template <typename G>
FIP_HD void fisher_accumulate_block(const PairEntry* table, int ntensors, int64_t chunk, DevScalar beta_s,
                                    DevScalar alpha_s, int64_t block, int thread, int nthreads) {
  const PairEntry e = table[find_tensor(table, ntensors, block)];
  const Span s = chunk_span(e, block, chunk);
  const float beta = read(beta_s), alpha = read(alpha_s);
  const bool al = is_aligned<float>(e.dst) && is_aligned<G>(e.src);
  for (int64_t j = static_cast<int64_t>(thread) * kVec; j < s.len; j += static_cast<int64_t>(nthreads) * kVec) {
    const int64_t i = s.start + j;
    const int n = s.len - j < kVec ? static_cast<int>(s.len - j) : kVec;
    const bool vec = al && n == kVec;
    float f[kVec], g[kVec];
    load<float>(e.dst, i, n, vec, f);
    load<G>(e.src, i, n, vec, g);
#pragma unroll
    for (int k = 0; k < kVec; ++k) f[k] = beta * f[k] + alpha * (g[k] * g[k]);
    store<float>(e.dst, i, n, vec, f);
  }
}

// theta <- theta + scale * g, unless found_inf
template <typename P, typename G>
FIP_HD void perturb_block(const PairEntry* table, int ntensors, int64_t chunk, DevScalar scale_s,
                          const float* found_inf, int64_t block, int thread, int nthreads) {
  if (skip_step(found_inf)) return;
  const PairEntry e = table[find_tensor(table, ntensors, block)];
  const Span s = chunk_span(e, block, chunk);
  const float scale = read(scale_s);
  const bool al = is_aligned<P>(e.dst) && is_aligned<G>(e.src);
  for (int64_t j = static_cast<int64_t>(thread) * kVec; j < s.len; j += static_cast<int64_t>(nthreads) * kVec) {
    const int64_t i = s.start + j;
    const int n = s.len - j < kVec ? static_cast<int>(s.len - j) : kVec;
    const bool vec = al && n == kVec;
    float th[kVec], g[kVec];
    load<P>(e.dst, i, n, vec, th);
    load<G>(e.src, i, n, vec, g);
#pragma unroll
    for (int k = 0; k < kVec; ++k) th[k] = th[k] + scale * g[k];
    store<P>(e.dst, i, n, vec, th);
  }
}

// The whole optimizer step of fip_fast.reference.fip_step_, same order of operations.
template <typename P, typename G, typename A>
FIP_HD void fip_step_block(const StepEntry* table, int ntensors, int64_t chunk, const StepArgs& a, int64_t block,
                           int thread, int nthreads) {
  if (skip_step(a.found_inf)) return;
  const StepEntry e = table[find_tensor(table, ntensors, block)];
  const Span s = chunk_span(e, block, chunk);

  const float lr = read(a.lr);
  const float mix = a.has_grad_pert ? read(a.mix) : 0.0f;
  const bool has_pert = a.has_pert;
  const bool has_restore = !has_pert && a.has_restore;
  const float rs = has_restore ? read(a.restore_scale) : 0.0f;
  const float nps = has_pert ? read(a.next_pert_scale) : 0.0f;
  // The bias correction is an fp32 number (reference: 1.0 - fp32(beta) ** fp32(t_i)), with this tensor's own step
  // count t_i when the entry has one (per-parameter state["step"]), else the call's single count.
  const float t_step = e.step != nullptr ? *e.step : read(a.step);
  const float bias_corr = a.precondition ? 1.0f - powf(a.beta, t_step) : 1.0f;
  const bool has_anchor = e.fisher0 != nullptr;  // the binding leaves fisher0 null when eta_r == 0
  const bool has_gp = a.has_grad_pert;

  const bool al = is_aligned<P>(e.param) && is_aligned<G>(e.grad) && is_aligned<G>(e.grad_pert) &&
                  is_aligned<float>(e.fisher0) && is_aligned<A>(e.anchor) && is_aligned<float>(e.momentum) &&
                  is_aligned<float>(e.fisher) && is_aligned<float>(e.pert);

  for (int64_t j = static_cast<int64_t>(thread) * kVec; j < s.len; j += static_cast<int64_t>(nthreads) * kVec) {
    const int64_t i = s.start + j;
    const int n = s.len - j < kVec ? static_cast<int>(s.len - j) : kVec;
    const bool vec = al && n == kVec;
    float th[kVec], g[kVec], gp[kVec], f0[kVec], a0[kVec], m[kVec], fi[kVec], pe[kVec];
    load<P>(e.param, i, n, vec, th);
    load<G>(e.grad, i, n, vec, g);
    if (has_gp) load<G>(e.grad_pert, i, n, vec, gp);
    if (has_anchor) {
      load<float>(e.fisher0, i, n, vec, f0);
      load<A>(e.anchor, i, n, vec, a0);
    }
    load<float>(e.momentum, i, n, vec, m);
    load<float>(e.fisher, i, n, vec, fi);
    if (has_pert) load<float>(e.pert, i, n, vec, pe);
#pragma unroll
    for (int k = 0; k < kVec; ++k) {
      float theta = th[k];
      const float gk = g[k];
      // 1. restore the point the gradients were taken at
      if (has_pert) theta = theta - pe[k];
      else if (has_restore) theta = theta - rs * gk;
      // 2. direction
      float d = has_gp ? gk + mix * (gp[k] - gk) : gk;
      if (has_anchor) d = d + (a.eta_r * f0[k]) * (theta - a0[k]);
      if (a.weight_decay != 0.0f) d = d + a.weight_decay * theta;
      // 3. Fisher EMA on g
      const float f = a.beta * fi[k] + (a.one_minus_beta * gk) * gk;
      fi[k] = f;
      // 4. preconditioning with bias correction
      if (a.precondition) d = d / (f / bias_corr + a.damping);
      // 5. momentum and update
      const float buf = a.momentum * m[k] + d;
      m[k] = buf;
      const float u = a.nesterov ? d + a.momentum * buf : buf;
      theta = theta - lr * u;
      // 6. next lagged perturbation: stored only; the optimizer applies it (perturb_) at the next forward
      if (has_pert) pe[k] = nps * gk;
      th[k] = theta;
    }
    store<P>(e.param, i, n, vec, th);
    store<float>(e.momentum, i, n, vec, m);
    store<float>(e.fisher, i, n, vec, fi);
    if (has_pert) store<float>(e.pert, i, n, vec, pe);
  }
}

// Per-thread part of the L2-norm stage 1: this thread's fp32 sum of squares over chunk ``block``.  The kernel then
// reduces the threads of the block (l2norm.cu); the emulation sums them in thread order.
template <typename T>
FIP_HD float l2norm_thread_sum(const NormEntry* table, int ntensors, int64_t chunk, int64_t block, int thread,
                               int nthreads) {
  const NormEntry e = table[find_tensor(table, ntensors, block)];
  const Span s = chunk_span(e, block, chunk);
  const bool al = is_aligned<T>(e.src);
  float acc = 0.0f;
  for (int64_t j = static_cast<int64_t>(thread) * kVec; j < s.len; j += static_cast<int64_t>(nthreads) * kVec) {
    const int64_t i = s.start + j;
    const int n = s.len - j < kVec ? static_cast<int>(s.len - j) : kVec;
    float x[kVec];
    load<T>(e.src, i, n, al && n == kVec, x);  // masked lanes are 0
#pragma unroll
    for (int k = 0; k < kVec; ++k) acc += x[k] * x[k];
  }
  return acc;
}

// Per-thread part of the L2-norm stage 2 (one block): this thread's fp64 sum of partials thread, thread + nthreads,
// ... up to n (every partial, whatever n).  The kernel reduces the threads (l2norm.cu); the emulation sums them in
// thread order.
FIP_HD double l2norm_finalize_thread_sum(const float* partials, int64_t n, int thread, int nthreads) {
  double acc = 0.0;
  for (int64_t i = thread; i < n; i += nthreads) acc += static_cast<double>(partials[i]);
  return acc;
}

// The stage-2 result from the total: the fp64 sum is cast to fp32 before the square root (so a squared norm that
// overflows fp32 gives inf, like the reference's fp32 accumulation), found_inf = 1 if the norm is not finite.
FIP_HD void l2norm_finalize_write(double total, float* out_norm, float* out_found_inf) {
  const float sq = static_cast<float>(total);
  const float norm = sqrtf(sq);
  *out_norm = norm;
#ifdef __CUDA_ARCH__
  const bool finite = isfinite(norm);
#else
  const bool finite = std::isfinite(norm);
#endif
  *out_found_inf = finite ? 0.0f : 1.0f;
}

}  // namespace detail
}  // namespace fip_fast

// Dtype dispatch: calls BODY with the C++ types bound to the names given.
#define FIP_DISPATCH_DTYPE(code, T, ...)                          \
  switch (code) {                                                 \
    case ::fip_fast::kF32: { using T = float; __VA_ARGS__; break; }         \
    case ::fip_fast::kF16: { using T = __half; __VA_ARGS__; break; }        \
    case ::fip_fast::kBF16: { using T = __nv_bfloat16; __VA_ARGS__; break; } \
    default: return cudaErrorInvalidValue;                        \
  }
