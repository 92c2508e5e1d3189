// Fused CPU kernels of fip_fast (impl="cpu"): the kernel contracts of fip_fast/reference.py on fp32 tensors,
// one pass over memory per tensor.  Plain C++ (no torch headers): built by fip_fast/backends/cpu.py with
//     g++ -O3 -march=native -fopenmp -ffp-contract=off -fno-math-errno -fno-trapping-math -fno-unswitch-loops
//         -shared -fPIC -std=c++17        (the exact list: CXXFLAGS in fip_fast/backends/cpu.py)
// -ffp-contract=off matters: the reference does every multiply and add as a separate fp32 operation (no FMA),
// and these loops do the same operations in the same order, so the results match it bit for bit.
#include <cmath>
#include <cstdint>
#include <omp.h>

namespace {
// below this many elements a tensor is done by the calling thread (an OpenMP fork costs more than the work)
constexpr int64_t kParallelMin = 1 << 16;
constexpr int64_t kChunk = 1 << 14;
// How far ahead (elements) the step and the norm prefetch each of their streams: 1 KiB, 16 cache lines.  The hardware
// prefetchers stop at every 4 KiB page and track a limited number of streams; the step reads 4–8 of them, and a
// software prefetch keeps more misses in flight across page ends (measured on the ResNet-18 list, one thread:
// 5–10 % less time per step; 512 elements measured the same, 4096 no gain, prefetches without temporal locality
// 1.5–2.5× slower).
constexpr int64_t kPrefetch = 256;

inline int threads_for(int64_t n, int nthreads) {
    if (nthreads <= 1 || n < kParallelMin) return 1;
    int64_t chunks = (n + kChunk - 1) / kChunk;
    return chunks < nthreads ? static_cast<int>(chunks) : nthreads;
}

// F ← β·F + α·g²   (reference: b * F + a * g.pow(2))
inline void fisher_range(float* __restrict f, const float* __restrict g, float b, float a, int64_t lo,
                         int64_t hi) {
    for (int64_t k = lo; k < hi; ++k) {
        float gk = g[k];
        f[k] = b * f[k] + a * (gk * gk);
    }
}

inline void perturb_range(float* __restrict p, const float* __restrict g, float s, int64_t lo, int64_t hi) {
    for (int64_t k = lo; k < hi; ++k) p[k] = p[k] + s * g[k];
}

// 16 fp32 lanes as one GCC/Clang vector: the accumulators stay in registers (a float[16] array is kept on the
// stack by GCC, and each add then waits on a store-to-load forward: measured 20 GB/s from L2, a third of what the
// loads allow).  Every lane does exactly the fp32 operations of the scalar form, so the sums are the same bits.
typedef float v8f __attribute__((vector_size(32)));
typedef float v8f_u __attribute__((vector_size(32), aligned(4), may_alias));   // an unaligned load

struct v16f {          // lanes 0–7 in lo, 8–15 in hi
    v8f lo, hi;
};

inline v16f load16(const float* p) {
    return {*reinterpret_cast<const v8f_u*>(p), *reinterpret_cast<const v8f_u*>(p + 8)};
}

inline void add_sq(v16f& acc, const v16f& a) {
    acc.lo += a.lo * a.lo;
    acc.hi += a.hi * a.hi;
}

inline float lanes_sum(const v16f& acc) {
    // lane order 0, 1, …, 15, as a loop over a float[16] would add them
    float t = 0.0f;
    for (int j = 0; j < 8; ++j) t += acc.lo[j];
    for (int j = 0; j < 8; ++j) t += acc.hi[j];
    return t;
}

inline double sumsq_blocks(const float* __restrict x, int64_t lo, int64_t hi) {
    // Blocks of 4096 elements summed in 16 independent fp32 lanes (each lane its own sum, 256 terms deep), each
    // block's total added in fp64: fp32 SIMD speed (no per-element conversion to double), and an error far below
    // fp32 summation of the whole tensor.  A square or a block sum that overflows fp32 gives inf, as the
    // reference's fp32 sum does.
    constexpr int64_t B = 4096;
    double s = 0.0;
    int64_t k = lo;
    for (; k + B <= hi; k += B) {
        v16f acc = {};
        for (int64_t i = k; i < k + B; i += 16) {
            add_sq(acc, load16(x + i));
        }
        s += lanes_sum(acc);
    }
    for (; k < hi; ++k) { const double a = x[k]; s += a * a; }
    return s;
}

// How far ahead (elements) the norm prefetches each of its streams: 2 KiB.
constexpr int64_t kNormPrefetch = 512;

inline double sumsq_range(const float* __restrict x, int64_t lo, int64_t hi) {
    // Eight equal parts of the range read side by side, a block of each per iteration (blocks as in sumsq_blocks):
    // a single stream leaves one core latency-bound, several keep more cache misses in flight.  This pass reads the
    // gradients cold just before the step kernel (FIP's finiteness check), where eight streams 2 KiB ahead made
    // the whole step (this pass + the kernel) 1-2 % faster than four streams 1 KiB ahead on the ResNet-18 list
    // (one thread, paired interleaved rounds; 16 streams measured the same as 8).  The tail that does not fill eight equal parts goes through
    // sumsq_blocks.  Every 4096-element block is summed in the same fp32 lanes whatever S is; S only changes
    // the order of the fp64 additions of the block sums.
    constexpr int S = 8;
    constexpr int64_t B = 4096;
    const int64_t per = (hi - lo) / B / S;        // blocks per part
    double s = 0.0;
    for (int64_t b = 0; b < per; ++b) {
        const float* q[S];
        for (int j = 0; j < S; ++j) q[j] = x + lo + (j * per + b) * B;
        v16f acc[S] = {};
        for (int64_t i = 0; i < B; i += 16) {
            // one prefetch per cache line and stream; not past the end of the range
            if (b + 1 < per || i + kNormPrefetch < B) {
                for (int j = 0; j < S; ++j) __builtin_prefetch(q[j] + i + kNormPrefetch);
            }
            for (int j = 0; j < S; ++j) add_sq(acc[j], load16(q[j] + i));
        }
        for (int j = 0; j < S; ++j) s += lanes_sum(acc[j]);
    }
    return s + sumsq_blocks(x, lo + S * per * B, hi);
}

struct StepArgs {
    float* p; const float* g; const float* gp; const float* f0; const float* a0; float* buf; float* fis;
    float* pert;
    float lr, mom, wd, eta_r, beta, one_minus_beta, mix, rs, bc, damping, nps;
    int nesterov, precondition, has_rs, has_wd;
};

// One element of reference.fip_step_, same fp32 operations in the same order.  The optional inputs (g', lagged
// pert, anchor) and preconditioning are template parameters (the pointers of absent inputs may be null; without
// the template parameter, the two divisions of preconditioning were computed on every element and masked off);
// the flags that only change cheap arithmetic (fd restore, weight decay, Nesterov) are loop-invariant selects —
// few instantiations, a fast build, and the loop still vectorizes.  The loop runs in blocks of 16 elements (one
// cache line of each stream) with a prefetch of every stream kPrefetch elements ahead.
template <bool HasGp, bool HasPert, bool HasAnchor, bool Pre>
void step_range_impl(float* __restrict p, const float* __restrict g, const float* __restrict gp,
                     const float* __restrict f0, const float* __restrict a0, float* __restrict buf,
                     float* __restrict fis, float* __restrict pert, const StepArgs& A, int64_t lo, int64_t hi) {
    // (restrict on function parameters: GCC ignores it on locals copied from a struct and then versions the loop
    // for aliasing, or gives up vectorizing)
    const float lr = A.lr, mom = A.mom, wd = A.wd, eta_r = A.eta_r, beta = A.beta, omb = A.one_minus_beta;
    const float mix = A.mix, rs = A.rs, bc = A.bc, damping = A.damping, nps = A.nps;
    const bool has_rs = A.has_rs != 0 && !HasPert, has_wd = A.has_wd != 0, nesterov = A.nesterov != 0;
    auto elem = [&](int64_t k) __attribute__((always_inline)) {
        const float gk = g[k];
        float theta = p[k];
        // 1. restore
        if (HasPert) theta = theta - pert[k];
        else theta = has_rs ? theta - rs * gk : theta;
        // 2. direction
        float d = gk;
        if (HasGp) d = gk + mix * (gp[k] - gk);
        if (HasAnchor) d = d + (eta_r * f0[k]) * (theta - a0[k]);
        d = has_wd ? d + wd * theta : d;
        // 3. Fisher EMA: beta * F + ((1 - beta) * g) * g
        const float fn = beta * fis[k] + (omb * gk) * gk;
        fis[k] = fn;
        // 4. preconditioning
        if (Pre) d = d / (fn / bc + damping);
        // 5. momentum and update
        const float b = mom * buf[k] + d;
        buf[k] = b;
        const float u = nesterov ? d + mom * b : b;
        theta = theta - lr * u;
        // 6. next lagged perturbation (stored only)
        if (HasPert) pert[k] = nps * gk;
        p[k] = theta;
    };
    int64_t k = lo;
    for (; k + 16 <= hi; k += 16) {
        if (k + kPrefetch < hi) {
            const int64_t a = k + kPrefetch;      // written streams prefetched for writing
            __builtin_prefetch(p + a, 1);
            __builtin_prefetch(g + a, 0);
            __builtin_prefetch(buf + a, 1);
            __builtin_prefetch(fis + a, 1);
            if (HasAnchor) {
                __builtin_prefetch(f0 + a, 0);
                __builtin_prefetch(a0 + a, 0);
            }
            if (HasGp) __builtin_prefetch(gp + a, 0);
            if (HasPert) __builtin_prefetch(pert + a, 1);
        }
        for (int j = 0; j < 16; ++j) elem(k + j);
    }
    for (; k < hi; ++k) elem(k);
}

template <bool HasGp, bool HasPert, bool HasAnchor>
void step_range(const StepArgs& A, int64_t lo, int64_t hi) {
    if (A.precondition)
        step_range_impl<HasGp, HasPert, HasAnchor, true>(A.p, A.g, A.gp, A.f0, A.a0, A.buf, A.fis, A.pert, A, lo, hi);
    else
        step_range_impl<HasGp, HasPert, HasAnchor, false>(A.p, A.g, A.gp, A.f0, A.a0, A.buf, A.fis, A.pert, A, lo,
                                                          hi);
}

typedef void (*StepFn)(const StepArgs&, int64_t, int64_t);

template <bool A>
StepFn pick2(bool pert, bool anchor) {
    if (pert) return anchor ? step_range<A, true, true> : step_range<A, true, false>;
    return anchor ? step_range<A, false, true> : step_range<A, false, false>;
}
StepFn pick(bool gp, bool pert, bool anchor) { return gp ? pick2<true>(pert, anchor) : pick2<false>(pert, anchor); }

template <class F>
void parallel_chunks(int64_t n, int nthreads, F body) {
    int nt = threads_for(n, nthreads);
    if (nt <= 1) { body(0, n); return; }
    int64_t chunks = (n + kChunk - 1) / kChunk;
#pragma omp parallel for num_threads(nt) schedule(static)
    for (int64_t c = 0; c < chunks; ++c) {
        int64_t lo = c * kChunk, hi = lo + kChunk < n ? lo + kChunk : n;
        body(lo, hi);
    }
}
}  // namespace

extern "C" {

int fip_cpu_abi_version() { return 2; }

void fisher_accumulate_f32(float* f, const float* g, int64_t n, float beta, float alpha, int nthreads) {
    parallel_chunks(n, nthreads, [=](int64_t lo, int64_t hi) { fisher_range(f, g, beta, alpha, lo, hi); });
}

void perturb_f32(float* p, const float* g, int64_t n, float scale, int nthreads) {
    parallel_chunks(n, nthreads, [=](int64_t lo, int64_t hi) { perturb_range(p, g, scale, lo, hi); });
}

double sumsq_f32(const float* x, int64_t n, int nthreads) {
    int nt = threads_for(n, nthreads);
    if (nt <= 1) return sumsq_range(x, 0, n);
    int64_t chunks = (n + kChunk - 1) / kChunk;
    double total = 0.0;
#pragma omp parallel for num_threads(nt) schedule(static) reduction(+ : total)
    for (int64_t c = 0; c < chunks; ++c) {
        int64_t lo = c * kChunk, hi = lo + kChunk < n ? lo + kChunk : n;
        total += sumsq_range(x, lo, hi);
    }
    return total;
}

// One tensor of reference.fip_step_.  gp / f0+a0 / pert may be null (no g', no anchor, not lagged).
// has_wd: add wd·θ (the host decides, as the reference does, on the Python value).
// has_rs: fd restore θ −= rs·g (ignored when pert is given).  bc: the fp32 bias correction 1 − β^t of this tensor.
void fip_step_f32(float* p, const float* g, const float* gp, const float* f0, const float* a0, float* buf,
                  float* fis, float* pert, int64_t n, float lr, float momentum, int nesterov, float weight_decay,
                  float eta_r, float beta, float one_minus_beta, float mix, int has_rs, float rs, int precondition,
                  float bc, float damping, float next_pert_scale, int has_wd, int nthreads) {
    StepArgs A{p, g, gp, f0, a0, buf, fis, pert, lr, momentum, weight_decay, eta_r, beta, one_minus_beta, mix,
               rs, bc, damping, next_pert_scale, nesterov, precondition, has_rs, has_wd};
    bool anchor = f0 != nullptr && a0 != nullptr;
    StepFn fn = pick(gp != nullptr, pert != nullptr, anchor);
    parallel_chunks(n, nthreads, [&](int64_t lo, int64_t hi) { fn(A, lo, hi); });
}

// Multi-tensor entry points: one call from Python for a whole list (the host cost of a call through ctypes is
// a few microseconds, so a call per tensor costs milliseconds for a model's few hundred tensors).  ``ptrs`` is a
// slot-major table: tensor i of slot s at ptrs[s·T + i] (null where a slot or an entry is absent); sizes[i] is
// the element count of tensor i in every slot.  Tensors are processed in list order, each as the single-tensor
// function above does, so results equal a loop over that function bit for bit.
void fisher_accumulate_multi_f32(void* const* ptrs, const int64_t* sizes, int64_t T, float beta, float alpha,
                                 int nthreads) {
    for (int64_t i = 0; i < T; ++i)
        if (sizes[i]) fisher_accumulate_f32(static_cast<float*>(ptrs[i]), static_cast<const float*>(ptrs[T + i]),
                                            sizes[i], beta, alpha, nthreads);
}

void perturb_multi_f32(void* const* ptrs, const int64_t* sizes, int64_t T, float scale, int nthreads) {
    for (int64_t i = 0; i < T; ++i)
        if (sizes[i]) perturb_f32(static_cast<float*>(ptrs[i]), static_cast<const float*>(ptrs[T + i]), sizes[i],
                                  scale, nthreads);
}

// Σ over tensors (in list order, fp64) of sumsq_f32 of each.
double sumsq_multi_f32(void* const* ptrs, const int64_t* sizes, int64_t T, int nthreads) {
    double s = 0.0;
    for (int64_t i = 0; i < T; ++i)
        if (sizes[i]) s += sumsq_f32(static_cast<const float*>(ptrs[i]), sizes[i], nthreads);
    return s;
}

// Slots: 0 params, 1 grads, 2 grads_pert, 3 fisher0, 4 anchor, 5 momentum, 6 fisher, 7 pert.  bcs: one bias
// correction per tensor, or null (then ``bc`` for all).
void fip_step_multi_f32(void* const* ptrs, const int64_t* sizes, int64_t T, const float* bcs, float lr,
                        float momentum, int nesterov, float weight_decay, float eta_r, float beta,
                        float one_minus_beta, float mix, int has_rs, float rs, int precondition, float bc,
                        float damping, float next_pert_scale, int has_wd, int nthreads) {
    auto f = [&](int s, int64_t i) { return static_cast<float*>(ptrs[s * T + i]); };
    for (int64_t i = 0; i < T; ++i) {
        if (!sizes[i]) continue;
        fip_step_f32(f(0, i), f(1, i), f(2, i), f(3, i), f(4, i), f(5, i), f(6, i), f(7, i), sizes[i], lr, momentum,
                     nesterov, weight_decay, eta_r, beta, one_minus_beta, mix, has_rs, rs, precondition,
                     bcs ? bcs[i] : bc, damping, next_pert_scale, has_wd, nthreads);
    }
}

}  // extern "C"
