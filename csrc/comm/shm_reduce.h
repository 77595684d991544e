// Element kernels of the shared-memory collectives: sum of several equally long arrays,
// accumulated in fp32 (fp64 for F64) in a fixed (rank) order, so every rank computes
// bitwise the same result. Raw pointers only; no torch.
#pragma once
#include <cstddef>
#include <cstdint>

namespace tp_numa::shm {

// F64 carries the float64 partial sums of row-parallel layers (exact mode: see
// tp_numa/layers/linear.py RowParallelLinear), so that tp=N rounds to fp32 once, like tp=1.
enum class DType : int { F32 = 0, BF16 = 1, F16 = 2, F64 = 3 };

inline size_t dtype_size(DType t) { return t == DType::F64 ? 8 : t == DType::F32 ? 4 : 2; }

// dst[i] = round_to_dtype( sum_{k=0..nsrc-1} float(srcs[k][i]) ), k in order (double for F64).
// dst may alias any srcs[k] (each element is read before it is written). A non-null
// dst2 receives the same values (saves a copy pass in the two-phase all-reduce).
void reduce_sum(DType t, void* dst, const void* const* srcs, int nsrc, size_t n, void* dst2 = nullptr);

// Scalar reference of reduce_sum (one element at a time, no vectorisation hints).
void reduce_sum_ref(DType t, void* dst, const void* const* srcs, int nsrc, size_t n);

}  // namespace tp_numa::shm
