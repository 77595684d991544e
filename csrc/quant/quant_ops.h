// ATen entry points of the quantized matmul ops (implemented in csrc/quant/*.cpp).
#pragma once
#include <ATen/ATen.h>
#include <string>

namespace tp_numa {

// y[M, N] = x[M, K] @ W^T, W given as raw GGUF rows: uint8 [N, row_bytes], qtype = GGML
// type id. x float32 or bfloat16, contiguous; y has x's dtype.
at::Tensor quant_matmul(const at::Tensor& x, const at::Tensor& w, int64_t qtype);

// Same product with a result that does not depend on how K is split (quant_matmul.cpp):
// every (row, block) term is the kernel's fp32 value for that one block, and the terms are
// summed in float64 in block order. y float64 [M, N]. Row-parallel layers use it so that
// tp=N (each rank a block range, partials summed in fp64) rounds to the same fp32 as tp=1.
// to_float32: return the float64 sums rounded to float32 (a layer with nothing to all-reduce).
at::Tensor quant_matmul_exact(const at::Tensor& x, const at::Tensor& w, int64_t qtype, bool to_float32);

// Raw GGUF rows uint8 [N, row_bytes] of type qtype -> float32 [N, K], bitwise what
// gguf.quants.dequantize gives (same float32 operations per block).
at::Tensor dequantize(const at::Tensor& w, int64_t qtype);
// float32 [..., K] (K % 32 == 0, contiguous) -> uint8 [..., K / 32 * 34] Q8_0 blocks, as
// ggml's quantize_row_q8_0 (and gguf.quants.quantize) make them: the Q8_0 KV cache format.
at::Tensor quantize_q8_0(const at::Tensor& x);

// The x4 layout (quant/packed_x4.h): four rows interleaved per block, for Q4_0/Q5_0/Q8_0.
// pack_x4: raw rows uint8 [N, row_bytes] -> packed uint8 [ceil(N/4), nb * 4 * block_bytes];
// unpack_x4 the inverse (n = N). quant_matmul_x4[_exact]: quant_matmul[_exact] on a packed
// weight of n rows (same results up to fp32 summation order).
at::Tensor pack_x4(const at::Tensor& w, int64_t qtype);
at::Tensor unpack_x4(const at::Tensor& wp, int64_t qtype, int64_t n);
at::Tensor quant_matmul_x4(const at::Tensor& x, const at::Tensor& wp, int64_t qtype, int64_t n);
at::Tensor quant_matmul_x4_exact(const at::Tensor& x, const at::Tensor& wp, int64_t qtype, int64_t n,
                                 bool to_float32);

// SIMD path in use ("avx512vnni", "avx512", "avx2", "scalar") and a way to force one
// (tests force "scalar" to check the reference; "auto" restores detection).
std::string kernel_isa();
void set_kernel_isa(const std::string& isa);

// Seconds to read every byte of buf (contiguous uint8) `repeats` times with all threads:
// the STREAM-like read kernel behind scripts/bench_matmul.py's bandwidth ceiling.
double read_bandwidth_probe(const at::Tensor& buf, int64_t repeats, int64_t streams, int64_t prefetch_bytes);

}  // namespace tp_numa
