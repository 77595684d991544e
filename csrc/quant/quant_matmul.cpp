// ATen wrapper of the quantized matmul: checks, activation preparation, threading, tiling.
//
//   y[M, N] = x[M, K] @ W^T,  W = N raw GGUF rows of K / block_elems blocks.
//
// 1. Every activation row is prepared once per call (float, or quantized to 8-bit blocks)
//    into a thread-local scratch buffer (no allocation once it has grown).
// 2. The N weight rows are split into contiguous ranges, one per thread (at::parallel_for,
//    threads = torch.get_num_threads()). Inside a range, rows go in tiles small enough to
//    stay in L1/L2; for each tile every activation row is applied while the tile is hot,
//    so for prefill (large M) each weight byte comes from memory once, not M times.
//
// quant_matmul_exact runs the same driver with the kernels' Exact accumulation (float64
// output): every block's fp32 term is added in float64, so the result for a row does not
// depend on how the row is split into block ranges. Row-parallel layers use it: tp ranks
// each sum their block range, the all-reduce adds the float64 partials, and the float32
// rounding of the total is (but for ~1e-9 of values, which sit within 1e-16 of an fp32
// rounding boundary) the same as tp=1's. Float weights take the scalar reference's exact
// dot (a rare case for a row-parallel layer).
#include <ATen/Parallel.h>
#include <ATen/ATen.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#include "quant/kernels.h"
#include "quant/quant_ops.h"

namespace tp_numa {
namespace {

using quant::ActKind;
using quant::Kernels;
using quant::TypeInfo;

// Weight bytes per tile: with a group of activation rows it fits a 1 MiB..2 MiB L2.
constexpr int64_t kTileBytes = 128 * 1024;
// Activation rows per pass over a weight tile (64 prepared rows of K = 4096 are ~300 KB).
constexpr int64_t kActRowsPerPass = 64;

// Grows (never shrinks) a per-thread buffer; the hot path allocates only on first use.
uint8_t* scratch(std::vector<uint8_t>& buf, size_t bytes) {
    if (buf.size() < bytes) buf.resize(bytes + 64);
    return buf.data();
}

// Prepares rows [m0, m1) of x into act (act_bytes per row).
void prepare_rows(const at::Tensor& x, int64_t m0, int64_t m1, ActKind kind, const Kernels& k,
                  uint8_t* act, size_t act_bytes) {
    const int64_t K = x.size(1);
    const bool is_bf16 = x.scalar_type() == at::kBFloat16;
    thread_local std::vector<uint8_t> row_buf;
    float* tmp = is_bf16 ? reinterpret_cast<float*>(scratch(row_buf, K * sizeof(float))) : nullptr;
    for (int64_t m = m0; m < m1; ++m) {
        const float* xr;
        if (is_bf16) {
            const auto* src = x.data_ptr<at::BFloat16>() + m * K;
            float* dst = kind == ActKind::kFloat ? reinterpret_cast<float*>(act + m * act_bytes) : tmp;
            for (int64_t i = 0; i < K; ++i) dst[i] = float(src[i]);
            xr = dst;
        } else {
            xr = x.data_ptr<float>() + m * K;
        }
        if (kind == ActKind::kQ8A) {
            k.quantize_q8a(xr, K, act + m * act_bytes);
        } else if (kind == ActKind::kQ8K) {
            k.quantize_q8k(xr, K, act + m * act_bytes);
        }
    }
}

void check_inputs(const at::Tensor& x, const at::Tensor& w, int64_t qtype, const TypeInfo* ti) {
    TORCH_CHECK(ti != nullptr, "quant_matmul: unknown or unsupported GGML type id ", qtype,
                " (supported: F32=0 F16=1 Q4_0=2 Q4_1=3 Q5_0=6 Q5_1=7 Q8_0=8 Q4_K=12 Q5_K=13 "
                "Q6_K=14 IQ4_NL=20 IQ4_XS=23 BF16=30)");
    TORCH_CHECK(x.device().is_cpu() && w.device().is_cpu(),
                "quant_matmul: x and w must be CPU tensors, got ", x.device(), " and ", w.device());
    TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16,
                "quant_matmul: x must be float32 or bfloat16, got ", x.scalar_type());
    TORCH_CHECK(x.dim() == 2, "quant_matmul: x must be 2-D [M, K], got shape ", x.sizes());
    TORCH_CHECK(x.is_contiguous(), "quant_matmul: x must be contiguous (call .contiguous())");
    TORCH_CHECK(w.scalar_type() == at::kByte,
                "quant_matmul: w must be uint8 raw GGUF bytes, got ", w.scalar_type());
    TORCH_CHECK(w.dim() == 2, "quant_matmul: w must be 2-D [N, row_bytes], got shape ", w.sizes());
    TORCH_CHECK(w.is_contiguous(),
                "quant_matmul: w must be contiguous (copy a row-parallel shard with .contiguous())");
    const int64_t K = x.size(1);
    TORCH_CHECK(K % ti->block_elems == 0, "quant_matmul: K=", K, " is not a multiple of the ",
                ti->name, " block size ", ti->block_elems);
    const int64_t row_bytes = K / ti->block_elems * ti->block_bytes;
    TORCH_CHECK(w.size(1) == row_bytes, "quant_matmul: w has ", w.size(1),
                " bytes per row but K=", K, " in ", ti->name, " needs ", row_bytes,
                " (w must be N x row_bytes = [", w.size(0), ", ", row_bytes, "])");
}

// Out = float: quant_matmul (Fast kernels); Out = double: quant_matmul_exact (Exact kernels).
template <class Out>
at::Tensor run_quant_matmul(const at::Tensor& x, const at::Tensor& w, int64_t qtype) {
    constexpr bool kExact = std::is_same_v<Out, double>;
    const TypeInfo* ti = quant::type_info(qtype);
    check_inputs(x, w, qtype, ti);
    const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
    const int64_t row_bytes = w.size(1);
    at::Tensor y = at::empty({M, N}, x.options().dtype(kExact ? at::kDouble : at::kFloat));
    auto result = [&]() { return kExact || x.scalar_type() == at::kFloat ? y : y.to(x.scalar_type()); };
    if (M == 0 || N == 0) return result();
    if (K == 0) {
        y.zero_();
        return result();
    }

    const Kernels& k = quant::active_kernels();
    using RowsT = void (*)(int, const uint8_t*, size_t, int, const void*, Out*);
    using TileT = void (*)(int, const uint8_t*, size_t, int, const uint8_t*, size_t, int, Out*, size_t);
    RowsT rows;
    TileT tile_fn;
    if constexpr (kExact) {
        rows = k.rows_exact[qtype] != nullptr ? k.rows_exact[qtype] : quant::scalar_kernels().rows_exact[qtype];
        tile_fn = M >= 2 ? k.tile_exact[qtype] : nullptr;
    } else {
        rows = k.rows[qtype] != nullptr ? k.rows[qtype] : quant::scalar_kernels().rows[qtype];
        tile_fn = M >= 2 ? k.tile[qtype] : nullptr;
    }
    const int nb = int(K / ti->block_elems);

    // activation rows, prepared once
    const size_t act_bytes = quant::act_row_bytes(ti->act, K);
    const uint8_t* act;
    if (ti->act == ActKind::kFloat && x.scalar_type() == at::kFloat) {
        act = reinterpret_cast<const uint8_t*>(x.data_ptr<float>());
    } else {
        thread_local std::vector<uint8_t> act_buf;
        uint8_t* buf = scratch(act_buf, M * act_bytes);
        const int64_t grain = std::max<int64_t>(1, 16384 / K);
        if (M > 1) {
            at::parallel_for(0, M, grain, [&](int64_t m0, int64_t m1) {
                prepare_rows(x, m0, m1, ti->act, k, buf, act_bytes);
            });
        } else {
            prepare_rows(x, 0, M, ti->act, k, buf, act_bytes);
        }
        act = buf;
    }

    // weight rows per tile, and the minimum rows per thread so a task is worth a wake-up
    const int64_t tile = std::max<int64_t>(1, kTileBytes / row_bytes);
    const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, row_bytes * M));
    const uint8_t* wp = w.data_ptr<uint8_t>();
    Out* yp = y.data_ptr<Out>();
    at::parallel_for(0, N, grain, [&](int64_t n0, int64_t n1) {
        for (int64_t t0 = n0; t0 < n1; t0 += tile) {
            const int nr = int(std::min(tile, n1 - t0));
            if (tile_fn != nullptr) {
                // prefill: the weight tile stays in L2 while groups of activation rows pass
                for (int64_t m0 = 0; m0 < M; m0 += kActRowsPerPass) {
                    const int mr = int(std::min<int64_t>(kActRowsPerPass, M - m0));
                    tile_fn(nb, wp + t0 * row_bytes, size_t(row_bytes), nr, act + m0 * act_bytes, act_bytes,
                            mr, yp + m0 * N + t0, size_t(N));
                }
            } else {
                for (int64_t m = 0; m < M; ++m) {
                    rows(nb, wp + t0 * row_bytes, size_t(row_bytes), nr, act + m * act_bytes,
                         yp + m * N + t0);
                }
            }
        }
    });
    return result();
}

}  // namespace

at::Tensor quant_matmul(const at::Tensor& x, const at::Tensor& w, int64_t qtype) {
    return run_quant_matmul<float>(x, w, qtype);
}

at::Tensor quant_matmul_exact(const at::Tensor& x, const at::Tensor& w, int64_t qtype) {
    return run_quant_matmul<double>(x, w, qtype);
}

}  // namespace tp_numa
