// Collectives over a shared-memory group (shm_group.h). Raw pointers only; no torch.
// All ranks of the group must call the same collectives in the same order with the same
// sizes (as with MPI). Errors (dead peer, abort) throw std::runtime_error.
#pragma once
#include <cstddef>
#include <vector>

#include "comm/shm_group.h"
#include "comm/shm_reduce.h"

namespace tp_numa::shm {

// data[i] <- sum over ranks (fp32 accumulate, rank order); n elements of dtype t.
void all_reduce(Group* g, DType t, void* data, size_t n);

// out <- concat over ranks of each rank's `in` (bytes[p] bytes from rank p). Only on
// `root` when root >= 0 (out may be null elsewhere); on every rank when root < 0.
void all_gather(Group* g, const void* in, const std::vector<size_t>& bytes, void* out, int root);

// data <- rank src's data (`bytes` bytes on every rank).
void broadcast(Group* g, void* data, size_t bytes, int src);

// Size (bytes) from which all_reduce switches to reduce-scatter + all-gather.
size_t two_phase_bytes();

}  // namespace tp_numa::shm
