// Torch binding of the fip_fast CUDA kernels (module fip_fast._C; reached only through fip_fast._cuda).
//
// Takes lists of at::Tensor, validates them, groups the tensors by dtype combination (one launch per group, so one
// launch per call in the usual case of a single dtype), builds the tensor tables (fip_fast_cuda.h), uploads them
// and calls the launchers of multi_tensor.cu / l2norm.cu on the current stream.  Nothing is synchronised with the
// host: scalars given as CUDA tensors are read by the kernels.
//
// Two kinds of failure:
//  * inputs the kernels do not support but the reference does (fp64 tensors, non-dense or mismatched layouts,
//    state not in fp32, ...): the function launches nothing and returns a non-empty reason, and fip_fast._cuda
//    falls back to the foreach implementation for that call (logged once);
//  * inputs that are wrong for every implementation (list lengths, shapes, a fisher0 without its anchor): an
//    exception (TORCH_CHECK).
//
// Tensor tables live in device memory.  They are content-addressed in a small LRU cache (key: device and the
// table's bytes), so an optimizer that calls with the same tensors every step uploads its tables once; a miss costs
// one pinned host-to-device copy, stream-ordered (no synchronisation).  A table reused on another stream is
// record_stream()-ed; one used during CUDA-graph capture is pinned (never evicted: the graph keeps its pointer).  A
// miss during capture is refused with a clear error: run the op once with the same tensors before capturing.
#include <torch/extension.h>

// Only c10's CUDA headers: ATen/cuda/CUDAContext.h would pull in cuBLAS / cuSPARSE / cuSOLVER headers, which
// minimal toolkits lack and these kernels don't need.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>
#include <pybind11/stl.h>

#include <atomic>
#include <cstring>
#include <iterator>
#include <list>
#include <map>
#include <mutex>
#include <optional>
#include <set>
#include <string>
#include <tuple>
#include <vector>

#include "fip_fast_cuda.h"
#include "tables.h"

namespace fip_fast {
namespace {

using TensorList = std::vector<at::Tensor>;
using OptTensor = std::optional<at::Tensor>;
using OptTensorList = std::vector<OptTensor>;

// ------------------------------------------------------------------------------------------------ bookkeeping

std::atomic<int64_t> g_launches[6];  // fisher_accumulate, perturb, fip_step, l2norm_partials, l2norm_finalize, uploads
enum Counter { kFisherAcc = 0, kPerturb, kFipStep, kNormPartials, kNormFinalize, kUploads };

void count(Counter c) { g_launches[c].fetch_add(1, std::memory_order_relaxed); }

void check_launch(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, "fip_fast CUDA: launch of ", what, " failed: ", cudaGetErrorString(err));
}

std::optional<DType> dtype_code(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return kF32;
    case at::kHalf: return kF16;
    case at::kBFloat16: return kBF16;
    default: return std::nullopt;
  }
}

std::string str(at::ScalarType t) { return std::string(c10::toString(t)); }

// ------------------------------------------------------------------------------------------------ table upload

class TableCache {
 public:
  // The device copy of `n` bytes of table for `dev`, used by a kernel about to be launched on `stream`.
  at::Tensor get(const void* data, size_t n, const at::Device& dev, const c10::cuda::CUDAStream& stream) {
    cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
    C10_CUDA_CHECK(cudaStreamIsCapturing(stream.stream(), &capture));
    const bool capturing = capture != cudaStreamCaptureStatusNone;
    std::lock_guard<std::mutex> lock(mu_);
    for (auto it = items_.begin(); it != items_.end(); ++it) {
      if (it->device != dev.index() || it->bytes.size() != n || std::memcmp(it->bytes.data(), data, n) != 0) continue;
      if (capturing) {
        // A captured graph keeps this pointer: never free the table (tables are a few KB).
        it->pinned = true;
      } else if (stream.stream() != it->alloc_stream && it->used_on.insert(stream.stream()).second) {
        // Used on another stream than the one it was allocated on: tell the caching allocator, so that freeing
        // it at eviction waits for that stream's work.
        it->table.record_stream(stream);
      }
      items_.splice(items_.begin(), items_, it);
      return items_.front().table;
    }
    TORCH_CHECK(!capturing,
                "fip_fast CUDA: a new tensor table would have to be uploaded during CUDA-graph capture; call the op "
                "once with the same tensors before capturing (the table is then cached and reused by the graph)");
    at::Tensor host = at::empty({static_cast<int64_t>(n)}, at::TensorOptions().dtype(at::kByte).pinned_memory(true));
    std::memcpy(host.data_ptr(), data, n);
    at::Tensor table = at::empty({static_cast<int64_t>(n)}, at::TensorOptions().dtype(at::kByte).device(dev));
    table.copy_(host, /*non_blocking=*/true);  // on the current stream (== stream); the pinned block is event-protected
    count(kUploads);
    items_.push_front(Item{dev.index(), stream.stream(), {}, false, std::string(static_cast<const char*>(data), n), table});
    // Evict the least recently used unpinned table; freed stream-ordered (record_stream covers other streams).
    if (items_.size() > kMaxItems) {
      for (auto it = std::prev(items_.end());; --it) {
        if (!it->pinned) {
          items_.erase(it);
          break;
        }
        if (it == items_.begin()) break;
      }
    }
    return table;
  }

 private:
  struct Item {
    int device;
    cudaStream_t alloc_stream;
    std::set<cudaStream_t> used_on;
    bool pinned;
    std::string bytes;
    at::Tensor table;
  };
  static constexpr size_t kMaxItems = 64;
  std::list<Item> items_;
  std::mutex mu_;
};

TableCache& table_cache() {
  static TableCache* cache = new TableCache();  // never destroyed: no CUDA frees during interpreter shutdown
  return *cache;
}

template <typename Entry>
const Entry* upload(const std::vector<Entry>& entries, const at::Device& dev, const c10::cuda::CUDAStream& stream) {
  at::Tensor t = table_cache().get(entries.data(), entries.size() * sizeof(Entry), dev, stream);
  return reinterpret_cast<const Entry*>(t.data_ptr());
}

int sm_count(int device) {
  static std::mutex mu;
  static std::map<int, int> cache;
  std::lock_guard<std::mutex> lock(mu);
  auto it = cache.find(device);
  if (it != cache.end()) return it->second;
  int n = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device));
  cache[device] = n;
  return n;
}

int64_t chunk_for(int64_t total_numel, const at::Device& dev) { return pick_chunk(total_numel, sm_count(dev.index())); }

// ------------------------------------------------------------------------------------------------ validation

// Why tensor `t` (list `what`, index i) cannot be processed elementwise together with parameter `p` by the kernels;
// "" when it can.  Both must have the same shape and either both be contiguous or share the strides of one dense,
// non-overlapping layout (e.g. channels_last), so that flat index k means the same element in both.
std::string layout_reason(const at::Tensor& t, const at::Tensor& p, const at::Device& dev, const char* what,
                          size_t i) {
  if (t.device() != dev) return std::string(what) + "[" + std::to_string(i) + "] is on " + t.device().str();
  if (t.is_contiguous() && p.is_contiguous()) return "";
  if (t.strides() == p.strides() && t.is_non_overlapping_and_dense() && p.is_non_overlapping_and_dense()) return "";
  return std::string(what) + "[" + std::to_string(i) + "] and its parameter are not both contiguous nor share one "
         "dense layout";
}

void check_shape(const at::Tensor& t, const at::Tensor& p, const char* what, size_t i) {
  TORCH_CHECK(t.defined(), "fip_fast CUDA: ", what, "[", i, "] is undefined");
  TORCH_CHECK(t.sizes() == p.sizes(), "fip_fast CUDA: ", what, "[", i, "] has shape ", t.sizes(),
              " but its parameter has shape ", p.sizes());
}

DevScalar dev_scalar(const OptTensor& t, double value, const at::Device& dev, const char* name) {
  if (!t.has_value() || !t->defined()) return DevScalar{nullptr, static_cast<float>(value)};
  TORCH_CHECK(t->device() == dev && t->scalar_type() == at::kFloat && t->numel() == 1, "fip_fast CUDA: ", name,
              " must be a one-element fp32 tensor on ", dev.str(), " (fip_fast._cuda converts it)");
  return DevScalar{t->data_ptr<float>(), 0.0f};
}

const float* flag_ptr(const OptTensor& t, const at::Device& dev) {
  if (!t.has_value() || !t->defined()) return nullptr;
  TORCH_CHECK(t->device() == dev && t->scalar_type() == at::kFloat && t->numel() == 1,
              "fip_fast CUDA: found_inf must be a one-element fp32 tensor on ", dev.str());
  return t->data_ptr<float>();
}

// ------------------------------------------------------------------------------------------------ ops

// F <- beta * F + alpha * g^2.  Returns "" when launched, else why the kernels can't take these tensors.
std::string fisher_accumulate(const TensorList& fisher, const TensorList& grads, const OptTensor& beta_t,
                              double beta, const OptTensor& alpha_t, double alpha) {
  TORCH_CHECK(fisher.size() == grads.size(), "fip_fast CUDA: fisher and grads differ in length");
  if (fisher.empty()) return "";
  const at::Device dev = fisher[0].device();
  if (!dev.is_cuda()) return "fisher[0] is not a CUDA tensor";
  std::map<int, std::vector<PairEntry>> groups;  // by grad dtype
  int64_t total = 0;
  for (size_t i = 0; i < fisher.size(); ++i) {
    const at::Tensor &f = fisher[i], &g = grads[i];
    check_shape(g, f, "grads", i);
    if (f.scalar_type() != at::kFloat) return "fisher[" + std::to_string(i) + "] is " + str(f.scalar_type()) + ", not fp32";
    const auto gd = dtype_code(g.scalar_type());
    if (!gd) return "grads[" + std::to_string(i) + "] has unsupported dtype " + str(g.scalar_type());
    if (f.device() != dev) return "fisher[" + std::to_string(i) + "] is on " + f.device().str();
    if (!f.is_non_overlapping_and_dense()) return "fisher[" + std::to_string(i) + "] is not dense";
    auto r = layout_reason(g, f, dev, "grads", i);
    if (!r.empty()) return r;
    if (f.numel() == 0) continue;
    groups[*gd].push_back(PairEntry{f.data_ptr(), g.data_ptr(), f.numel(), 0});
    total += f.numel();
  }
  if (groups.empty()) return "";
  c10::cuda::CUDAGuard guard(dev);
  const DevScalar b = dev_scalar(beta_t, beta, dev, "beta"), a = dev_scalar(alpha_t, alpha, dev, "alpha");
  const c10::cuda::CUDAStream cstream = c10::cuda::getCurrentCUDAStream(dev.index());
  cudaStream_t stream = cstream.stream();
  const int64_t chunk = chunk_for(total, dev);
  for (auto& kv : groups) {
    const int64_t nchunks = assign_chunks(kv.second, chunk);
    const PairEntry* table = upload(kv.second, dev, cstream);
    check_launch(launch_fisher_accumulate(static_cast<DType>(kv.first), table, static_cast<int>(kv.second.size()),
                                          nchunks, chunk, b, a, stream), "fisher_accumulate_kernel");
    count(kFisherAcc);
  }
  return "";
}

// theta <- theta + scale * g unless *found_inf != 0.
std::string perturb(const TensorList& params, const TensorList& grads, const OptTensor& scale_t, double scale,
                    const OptTensor& found_inf) {
  TORCH_CHECK(params.size() == grads.size(), "fip_fast CUDA: params and grads differ in length");
  if (params.empty()) return "";
  const at::Device dev = params[0].device();
  if (!dev.is_cuda()) return "params[0] is not a CUDA tensor";
  std::map<std::pair<int, int>, std::vector<PairEntry>> groups;  // by (param dtype, grad dtype)
  int64_t total = 0;
  for (size_t i = 0; i < params.size(); ++i) {
    const at::Tensor &p = params[i], &g = grads[i];
    check_shape(g, p, "grads", i);
    const auto pd = dtype_code(p.scalar_type()), gd = dtype_code(g.scalar_type());
    if (!pd) return "params[" + std::to_string(i) + "] has unsupported dtype " + str(p.scalar_type());
    if (!gd) return "grads[" + std::to_string(i) + "] has unsupported dtype " + str(g.scalar_type());
    if (p.device() != dev) return "params[" + std::to_string(i) + "] is on " + p.device().str();
    if (!p.is_non_overlapping_and_dense()) return "params[" + std::to_string(i) + "] is not dense";
    auto r = layout_reason(g, p, dev, "grads", i);
    if (!r.empty()) return r;
    if (p.numel() == 0) continue;
    groups[{*pd, *gd}].push_back(PairEntry{p.data_ptr(), g.data_ptr(), p.numel(), 0});
    total += p.numel();
  }
  if (groups.empty()) return "";
  c10::cuda::CUDAGuard guard(dev);
  const DevScalar s = dev_scalar(scale_t, scale, dev, "scale");
  const float* fi = flag_ptr(found_inf, dev);
  const c10::cuda::CUDAStream cstream = c10::cuda::getCurrentCUDAStream(dev.index());
  cudaStream_t stream = cstream.stream();
  const int64_t chunk = chunk_for(total, dev);
  for (auto& kv : groups) {
    const int64_t nchunks = assign_chunks(kv.second, chunk);
    const PairEntry* table = upload(kv.second, dev, cstream);
    check_launch(launch_perturb(static_cast<DType>(kv.first.first), static_cast<DType>(kv.first.second), table,
                                static_cast<int>(kv.second.size()), nchunks, chunk, s, fi, stream),
                 "perturb_kernel");
    count(kPerturb);
  }
  return "";
}

// The fused optimizer step (fip_fast.reference.fip_step_).  has_restore / has_nps say whether restore_scale /
// next_pert_scale were given (not None); found_inf, when given, is a CUDA fp32 flag (a host-side non-zero flag is
// handled in Python by not calling at all).  steps, when given (and precondition), holds one one-element fp32 CUDA
// tensor per parameter (its state["step"]): each tensor's bias correction uses its own count, read by the kernel;
// otherwise step_t / step is the count of every tensor.  The lagged step stores pert = nps * g without adding it.
std::string fip_step(const TensorList& params, const TensorList& grads, const std::optional<TensorList>& grads_pert,
                     const OptTensorList& fisher0, const OptTensorList& anchor, const TensorList& momentum_buf,
                     const TensorList& fisher, const std::optional<TensorList>& pert, const OptTensor& lr_t,
                     double lr, double momentum, bool nesterov, double weight_decay, double eta_r, double beta,
                     const OptTensor& mix_t, double mix, bool has_restore, const OptTensor& restore_t,
                     double restore_scale, bool precondition, double damping, const OptTensor& step_t, double step,
                     const std::optional<TensorList>& steps, bool has_nps, const OptTensor& nps_t,
                     double next_pert_scale, const OptTensor& found_inf) {
  const size_t n = params.size();
  TORCH_CHECK(grads.size() == n && momentum_buf.size() == n && fisher.size() == n && fisher0.size() == n &&
                  anchor.size() == n && (!grads_pert || grads_pert->size() == n) && (!pert || pert->size() == n),
              "fip_fast CUDA: fip_step_ lists differ in length");
  TORCH_CHECK(!steps || steps->size() == n, "fip_fast CUDA: steps has ", steps ? steps->size() : 0,
              " entries, params has ", n, " (one step count per tensor)");
  if (n == 0) return "";
  const at::Device dev = params[0].device();
  if (!dev.is_cuda()) return "params[0] is not a CUDA tensor";
  const bool use_anchor = eta_r != 0.0;
  const bool per_tensor_step = precondition && steps.has_value();

  // Groups by (param dtype, grad dtype, anchor dtype); entries without an anchor join any group of their
  // (param, grad) pair, so that mixing anchored and free tensors costs no extra launch.
  std::map<std::tuple<int, int, int>, std::vector<StepEntry>> groups;
  std::vector<StepEntry> free_entries;
  std::vector<std::pair<int, int>> free_keys;
  int64_t total = 0;
  auto fp32_state = [&](const at::Tensor& t, const at::Tensor& p, const char* what, size_t i) -> std::string {
    check_shape(t, p, what, i);
    if (t.scalar_type() != at::kFloat) return std::string(what) + "[" + std::to_string(i) + "] is " + str(t.scalar_type()) + ", not fp32";
    return layout_reason(t, p, dev, what, i);
  };
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& p = params[i];
    TORCH_CHECK(p.defined(), "fip_fast CUDA: params[", i, "] is undefined");
    const auto pd = dtype_code(p.scalar_type());
    if (!pd) return "params[" + std::to_string(i) + "] has unsupported dtype " + str(p.scalar_type());
    if (p.device() != dev) return "params[" + std::to_string(i) + "] is on " + p.device().str();
    if (!p.is_non_overlapping_and_dense()) return "params[" + std::to_string(i) + "] is not dense";
    const at::Tensor& g = grads[i];
    check_shape(g, p, "grads", i);
    const auto gd = dtype_code(g.scalar_type());
    if (!gd) return "grads[" + std::to_string(i) + "] has unsupported dtype " + str(g.scalar_type());
    std::string r = layout_reason(g, p, dev, "grads", i);
    if (!r.empty()) return r;
    const void* gp = nullptr;
    if (grads_pert) {
      const at::Tensor& t = (*grads_pert)[i];
      check_shape(t, p, "grads_pert", i);
      if (t.scalar_type() != g.scalar_type())
        return "grads_pert[" + std::to_string(i) + "] is " + str(t.scalar_type()) + " but grads[" + std::to_string(i) + "] is " + str(g.scalar_type());
      if (!(r = layout_reason(t, p, dev, "grads_pert", i)).empty()) return r;
      gp = t.data_ptr();
    }
    if (!(r = fp32_state(momentum_buf[i], p, "momentum_buf", i)).empty()) return r;
    if (!(r = fp32_state(fisher[i], p, "fisher", i)).empty()) return r;
    float* pe = nullptr;
    if (pert) {
      if (!(r = fp32_state((*pert)[i], p, "pert", i)).empty()) return r;
      pe = (*pert)[i].data_ptr<float>();
    }
    const float* f0 = nullptr;
    const void* a0 = nullptr;
    int ad = -1;
    const bool anchored = fisher0[i].has_value() && fisher0[i]->defined();
    if (anchored && use_anchor) {
      TORCH_CHECK(anchor[i].has_value() && anchor[i]->defined(), "fip_fast CUDA: fisher0[", i,
                  "] is given but anchor[", i, "] is None");
      if (!(r = fp32_state(*fisher0[i], p, "fisher0", i)).empty()) return r;
      const at::Tensor& a = *anchor[i];
      check_shape(a, p, "anchor", i);
      const auto adt = dtype_code(a.scalar_type());
      if (!adt || (*adt != kF32 && *adt != *pd))
        return "anchor[" + std::to_string(i) + "] is " + str(a.scalar_type()) + "; the kernels take fp32 anchors or "
               "anchors in the parameter dtype (" + str(p.scalar_type()) + ")";
      if (!(r = layout_reason(a, p, dev, "anchor", i)).empty()) return r;
      f0 = fisher0[i]->data_ptr<float>();
      a0 = a.data_ptr();
      ad = *adt;
    }
    const float* st = nullptr;
    if (per_tensor_step) {
      const at::Tensor& s = (*steps)[i];
      TORCH_CHECK(s.defined() && s.device() == dev && s.scalar_type() == at::kFloat && s.numel() == 1,
                  "fip_fast CUDA: steps[", i, "] must be a one-element fp32 tensor on ", dev.str(),
                  " (fip_fast._cuda converts it)");
      st = s.data_ptr<float>();
    }
    if (p.numel() == 0) continue;
    const StepEntry e{p.data_ptr(), g.data_ptr(), gp, f0, a0, momentum_buf[i].data_ptr<float>(),
                      fisher[i].data_ptr<float>(), pe, st, p.numel(), 0};
    total += p.numel();
    if (ad < 0) {
      free_entries.push_back(e);
      free_keys.emplace_back(*pd, *gd);
    } else {
      groups[{*pd, *gd, ad}].push_back(e);
    }
  }
  for (size_t k = 0; k < free_entries.size(); ++k) {
    const int pd = free_keys[k].first, gd = free_keys[k].second;
    auto it = groups.lower_bound({pd, gd, -1});
    if (it != groups.end() && std::get<0>(it->first) == pd && std::get<1>(it->first) == gd)
      it->second.push_back(free_entries[k]);
    else
      groups[{pd, gd, static_cast<int>(kF32)}].push_back(free_entries[k]);
  }
  if (groups.empty()) return "";

  c10::cuda::CUDAGuard guard(dev);
  StepArgs a{};
  a.lr = dev_scalar(lr_t, lr, dev, "lr");
  a.has_grad_pert = grads_pert.has_value();
  a.mix = a.has_grad_pert ? dev_scalar(mix_t, mix, dev, "mix") : DevScalar{nullptr, 0.0f};
  a.has_pert = pert.has_value();
  a.has_restore = has_restore && !a.has_pert;
  a.restore_scale = a.has_restore ? dev_scalar(restore_t, restore_scale, dev, "restore_scale") : DevScalar{nullptr, 0.0f};
  a.precondition = precondition;
  a.step = precondition ? dev_scalar(step_t, step, dev, "step") : DevScalar{nullptr, 1.0f};
  a.next_pert_scale = (a.has_pert && has_nps) ? dev_scalar(nps_t, next_pert_scale, dev, "next_pert_scale")
                                              : DevScalar{nullptr, 0.0f};
  a.found_inf = flag_ptr(found_inf, dev);
  a.momentum = static_cast<float>(momentum);
  a.weight_decay = static_cast<float>(weight_decay);
  a.eta_r = static_cast<float>(eta_r);
  a.beta = static_cast<float>(beta);
  a.one_minus_beta = static_cast<float>(1.0 - beta);
  a.damping = static_cast<float>(damping);
  a.nesterov = nesterov;

  const c10::cuda::CUDAStream cstream = c10::cuda::getCurrentCUDAStream(dev.index());
  cudaStream_t stream = cstream.stream();
  const int64_t chunk = chunk_for(total, dev);
  for (auto& kv : groups) {
    const int64_t nchunks = assign_chunks(kv.second, chunk);
    const StepEntry* table = upload(kv.second, dev, cstream);
    check_launch(launch_fip_step(static_cast<DType>(std::get<0>(kv.first)), static_cast<DType>(std::get<1>(kv.first)),
                                 static_cast<DType>(std::get<2>(kv.first)), table, static_cast<int>(kv.second.size()),
                                 nchunks, chunk, a, stream),
                 "fip_step_kernel");
    count(kFipStep);
  }
  return "";
}

// (norm, found_inf, reason): reason != "" means nothing was computed (unsupported dtype / device).
std::tuple<at::Tensor, at::Tensor, std::string> global_norm(const TensorList& tensors) {
  if (tensors.empty()) return {at::Tensor(), at::Tensor(), "no tensors"};
  const at::Device dev = tensors[0].device();
  if (!dev.is_cuda()) return {at::Tensor(), at::Tensor(), "tensors[0] is not a CUDA tensor"};
  std::map<int, std::vector<NormEntry>> groups;
  TensorList keep;  // dense copies of strided inputs, alive until their kernel is enqueued
  int64_t total = 0;
  for (size_t i = 0; i < tensors.size(); ++i) {
    at::Tensor t = tensors[i];
    TORCH_CHECK(t.defined(), "fip_fast CUDA: tensors[", i, "] is undefined");
    const auto d = dtype_code(t.scalar_type());
    if (!d) return {at::Tensor(), at::Tensor(), "tensors[" + std::to_string(i) + "] has unsupported dtype " + str(t.scalar_type())};
    if (t.device() != dev) return {at::Tensor(), at::Tensor(), "tensors[" + std::to_string(i) + "] is on " + t.device().str()};
    if (t.numel() == 0) continue;
    if (!t.is_non_overlapping_and_dense()) {
      t = t.contiguous();
      keep.push_back(t);
    }
    groups[*d].push_back(NormEntry{t.data_ptr(), t.numel(), 0});
    total += t.numel();
  }
  c10::cuda::CUDAGuard guard(dev);
  const c10::cuda::CUDAStream cstream = c10::cuda::getCurrentCUDAStream(dev.index());
  cudaStream_t stream = cstream.stream();
  const int64_t chunk = chunk_for(total, dev);
  int64_t npartials = 0;
  for (auto& kv : groups) npartials += assign_chunks(kv.second, chunk);
  at::Tensor out = at::empty({2}, at::TensorOptions().dtype(at::kFloat).device(dev));
  at::Tensor partials = at::empty({npartials > 0 ? npartials : 1}, at::TensorOptions().dtype(at::kFloat).device(dev));
  float* pp = partials.data_ptr<float>();
  int64_t offset = 0;
  for (auto& kv : groups) {
    const int64_t nchunks = kv.second.back().chunk_start + (kv.second.back().numel + chunk - 1) / chunk;
    const NormEntry* table = upload(kv.second, dev, cstream);
    check_launch(launch_l2norm_partials(static_cast<DType>(kv.first), table, static_cast<int>(kv.second.size()),
                                        nchunks, chunk, pp + offset, stream),
                 "l2norm_partials_kernel");
    count(kNormPartials);
    offset += nchunks;
  }
  float* po = out.data_ptr<float>();
  check_launch(launch_l2norm_finalize(pp, npartials, po, po + 1, stream), "l2norm_finalize_kernel");
  count(kNormFinalize);
  return {out.select(0, 0), out.select(0, 1), ""};
}

pybind11::dict launch_counts() {
  pybind11::dict d;
  const char* names[6] = {"fisher_accumulate_kernel", "perturb_kernel", "fip_step_kernel", "l2norm_partials_kernel",
                          "l2norm_finalize_kernel", "table_uploads"};
  for (int i = 0; i < 6; ++i) d[names[i]] = g_launches[i].load(std::memory_order_relaxed);
  return d;
}

}  // namespace
}  // namespace fip_fast

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fip_fast CUDA kernels (use through fip_fast.ops / fip_fast._cuda)";
  m.def("fisher_accumulate", &fip_fast::fisher_accumulate, "F <- beta*F + alpha*g^2; returns '' or why not run");
  m.def("perturb", &fip_fast::perturb, "theta <- theta + scale*g unless found_inf; returns '' or why not run");
  m.def("fip_step", &fip_fast::fip_step, "the fused FIP optimizer step; returns '' or why not run");
  m.def("global_norm", &fip_fast::global_norm, "(norm, found_inf, reason) of a list of tensors");
  m.def("launch_counts", &fip_fast::launch_counts, "kernel launches and table uploads since import");
  m.attr("CHUNK_MIN") = static_cast<int64_t>(fip_fast::kMinChunk);
  m.attr("CHUNK_MAX") = static_cast<int64_t>(fip_fast::kMaxChunk);
}
