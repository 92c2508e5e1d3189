// Chunk bookkeeping of the multi-tensor tables (fip_fast_cuda.h), shared by the torch binding and the CPU
// emulation test.  Plain C++: no torch, no CUDA.
#pragma once

#include <cstdint>
#include <vector>

namespace fip_fast {

constexpr int kThreadsPerBlock = 256;
constexpr int kMinChunk = 2048;
constexpr int kMaxChunk = 65536;
constexpr int kFinalizeThreads = 512;  // threads of the one-block L2-norm finalize (l2norm.cu)

// Elements per chunk (one CUDA block each): aim for >= 8 blocks per SM on the whole call so that small models
// still fill the GPU, but never fewer than kMinChunk elements (then block scheduling and the per-block table
// lookup would dominate) nor more than kMaxChunk.  Always a power of two, hence a multiple of the vector width 4.
inline int64_t pick_chunk(int64_t total_numel, int num_sms) {
  if (num_sms < 1) num_sms = 1;
  const int64_t target = total_numel / (8 * static_cast<int64_t>(num_sms));
  int64_t chunk = kMinChunk;
  while (chunk < target && chunk < kMaxChunk) chunk *= 2;
  return chunk;
}

// Sets entries[i].chunk_start to the index of tensor i's first chunk and returns the total number of chunks.
// Entries must have numel > 0 (the binding leaves empty tensors out of the table).
template <typename Entry>
inline int64_t assign_chunks(std::vector<Entry>& entries, int64_t chunk) {
  int64_t next = 0;
  for (auto& e : entries) {
    e.chunk_start = next;
    next += (e.numel + chunk - 1) / chunk;
  }
  return next;
}

}  // namespace fip_fast
