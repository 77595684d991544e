// ATen wrapper of the quantized matmul: checks, activation preparation, threading, tiling.
//
//   y[M, N] = x[M, K] @ W^T,  W = N raw GGUF rows of K / block_elems blocks.
//
// 1. Every activation row is prepared once per call (float, or quantized to 8-bit blocks)
//    into a thread-local scratch buffer (no allocation once it has grown).
// 2. The N weight rows are split into contiguous ranges, one per thread (at::parallel_for,
//    threads = torch.get_num_threads()). For M >= 2, rows go in tiles small enough to
//    stay in L1/L2 inside a range; for each tile every activation row is applied while the
//    tile is hot, so for prefill each weight byte comes from memory once, not M times. A
//    GEMV (M = 1) hands the kernel its whole range, which it reads as several far-apart
//    streams (rows_by4, and x4_gemv for the x4 layout).
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

#include "memory/weight_memory.h"
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
        if (kind != ActKind::kFloat) quant::prepare_row(k, kind, xr, K, act + m * act_bytes);
    }
}

// Every activation row of x in the form `kind`, prepared once per call into a thread-local
// buffer (threads split the rows); float32 rows for float weights are used in place.
const uint8_t* prepare_activation(const at::Tensor& x, ActKind kind, const Kernels& k) {
    if (kind == ActKind::kFloat && x.scalar_type() == at::kFloat) {
        return reinterpret_cast<const uint8_t*>(x.data_ptr<float>());
    }
    const int64_t M = x.size(0), K = x.size(1);
    const size_t act_bytes = quant::act_row_bytes(kind, K);
    thread_local std::vector<uint8_t> act_buf;
    uint8_t* buf = scratch(act_buf, M * act_bytes);
    if (M > 1) {
        at::parallel_for(0, M, std::max<int64_t>(1, 16384 / K), [&](int64_t m0, int64_t m1) {
            prepare_rows(x, m0, m1, kind, k, buf, act_bytes);
        });
    } else {
        prepare_rows(x, 0, M, kind, k, buf, act_bytes);
    }
    return buf;
}

// The activation checks both ops share: `op` names the op in the message.
void check_activation(const char* op, const at::Tensor& x, const TypeInfo* ti) {
    TORCH_CHECK(x.device().is_cpu(), op, ": x must be a CPU tensor, got ", x.device());
    TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16,
                op, ": x must be float32 or bfloat16, got ", x.scalar_type());
    TORCH_CHECK(x.dim() == 2, op, ": x must be 2-D [M, K], got shape ", x.sizes());
    TORCH_CHECK(x.is_contiguous(), op, ": x must be contiguous (call .contiguous())");
    TORCH_CHECK(x.size(1) % ti->block_elems == 0, op, ": K=", x.size(1), " is not a multiple of the ",
                ti->name, " block size ", ti->block_elems);
}

void check_inputs(const at::Tensor& x, const at::Tensor& w, int64_t qtype, const TypeInfo* ti) {
    TORCH_CHECK(ti != nullptr, "quant_matmul: unknown or unsupported GGML type id ", qtype,
                " (supported: F32=0 F16=1 Q4_0=2 Q4_1=3 Q5_0=6 Q5_1=7 Q8_0=8 Q4_K=12 Q5_K=13 "
                "Q6_K=14 IQ4_NL=20 IQ4_XS=23 BF16=30)");
    TORCH_CHECK(w.device().is_cpu(), "quant_matmul: w must be a CPU tensor, got ", w.device());
    check_activation("quant_matmul", x, ti);
    TORCH_CHECK(w.scalar_type() == at::kByte,
                "quant_matmul: w must be uint8 raw GGUF bytes, got ", w.scalar_type());
    TORCH_CHECK(w.dim() == 2, "quant_matmul: w must be 2-D [N, row_bytes], got shape ", w.sizes());
    TORCH_CHECK(w.is_contiguous(),
                "quant_matmul: w must be contiguous (copy a row-parallel shard with .contiguous())");
    const int64_t K = x.size(1);
    const int64_t row_bytes = K / ti->block_elems * ti->block_bytes;
    TORCH_CHECK(w.size(1) == row_bytes, "quant_matmul: w has ", w.size(1),
                " bytes per row but K=", K, " in ", ti->name, " needs ", row_bytes,
                " (w must be N x row_bytes = [", w.size(0), ", ", row_bytes, "])");
}

using quant::pick;

// The output y [M, n]: float32 (Fast) or float64 (Exact); finish() gives it x's dtype.
template <class Out>
at::Tensor new_output(const at::Tensor& x, int64_t n) {
    return at::empty({x.size(0), n}, x.options().dtype(std::is_same_v<Out, double> ? at::kDouble : at::kFloat));
}
template <class Out>
at::Tensor finish(const at::Tensor& x, const at::Tensor& y) {
    return std::is_same_v<Out, double> || x.scalar_type() == at::kFloat ? y : y.to(x.scalar_type());
}

// Out = float: quant_matmul (Fast kernels); Out = double: quant_matmul_exact (Exact kernels).
template <class Out>
at::Tensor run_quant_matmul(const at::Tensor& x, const at::Tensor& w, int64_t qtype) {
    const TypeInfo* ti = quant::type_info(qtype);
    check_inputs(x, w, qtype, ti);
    const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
    const int64_t row_bytes = w.size(1);
    at::Tensor y = new_output<Out>(x, N);
    if (M == 0 || N == 0 || K == 0) return finish<Out>(x, y.zero_());

    const Kernels& k = quant::active_kernels();
    const Kernels& ref = quant::scalar_kernels();
    auto rows = pick<Out>(k.rows[qtype], k.rows_exact[qtype]);
    if (rows == nullptr) rows = pick<Out>(ref.rows[qtype], ref.rows_exact[qtype]);
    const auto tile_fn = M >= 2 ? pick<Out>(k.tile[qtype], k.tile_exact[qtype]) : nullptr;
    const int nb = int(K / ti->block_elems);

    const size_t act_bytes = quant::act_row_bytes(ti->act, K);
    const uint8_t* act = prepare_activation(x, ti->act, k);

    // weight rows per tile, and the minimum rows per thread so a task is worth a wake-up
    const int64_t tile = std::max<int64_t>(1, kTileBytes / row_bytes);
    const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, row_bytes * M));
    const uint8_t* wp = w.data_ptr<uint8_t>();
    Out* yp = y.data_ptr<Out>();
    at::parallel_for(0, N, grain, [&](int64_t n0, int64_t n1) {
        // GEMV: no tiles (they exist for the reuse of prefill); the kernel's streams span the
        // thread's whole range (rows_by4)
        if (M == 1) return rows(nb, wp + n0 * row_bytes, size_t(row_bytes), int(n1 - n0), act, yp + n0);
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
    return finish<Out>(x, y);
}

// ---- the x4 layout (packed_x4.h) ----

const TypeInfo* check_x4_type(const char* op, int64_t qtype) {
    const TypeInfo* ti = quant::type_info(qtype);
    TORCH_CHECK(ti != nullptr && quant::x4_group_bytes(qtype) > 0, op, ": GGML type id ", qtype,
                " has no x4 layout (Q4_0=2, Q5_0=6, Q8_0=8, Q4_K=12, Q5_K=13 and Q6_K=14 do)");
    return ti;
}

void check_x4_weight(const char* op, const at::Tensor& wp, const TypeInfo* ti, int64_t qtype, int64_t K, int64_t n) {
    TORCH_CHECK(wp.device().is_cpu() && wp.scalar_type() == at::kByte && wp.dim() == 2 && wp.is_contiguous(), op,
                ": the packed weight must be a contiguous CPU uint8 [groups, group_row_bytes] tensor, got ",
                wp.scalar_type(), " ", wp.sizes());
    TORCH_CHECK(n >= 0, op, ": n=", n, " rows is negative");
    const int64_t groups = (n + 3) / 4, gbytes = K / ti->block_elems * quant::x4_group_bytes(qtype);
    TORCH_CHECK(wp.size(0) == groups && wp.size(1) == gbytes, op, ": packed ", ti->name, " weight of n=", n,
                " rows and K=", K, " must be [", groups, ", ", gbytes, "], got ", wp.sizes());
}

// y[M, n] = x @ W^T for W packed in the x4 layout. Threads split the row groups; the last
// group of n % 4 != 0 rows is computed into a small buffer and its real rows copied out.
template <class Out>
at::Tensor run_quant_matmul_x4(const at::Tensor& x, const at::Tensor& wp, int64_t qtype, int64_t n) {
    constexpr bool kExact = std::is_same_v<Out, double>;
    const char* op = kExact ? "quant_matmul_x4_exact" : "quant_matmul_x4";
    const TypeInfo* ti = check_x4_type(op, qtype);
    check_activation(op, x, ti);
    const int64_t M = x.size(0), K = x.size(1);
    check_x4_weight(op, wp, ti, qtype, K, n);
    at::Tensor y = new_output<Out>(x, n);
    if (M == 0 || n == 0 || K == 0) return finish<Out>(x, y.zero_());

    const Kernels& k = quant::active_kernels();
    const auto rows = pick<Out>(k.rows_x4[qtype], k.rows_x4_exact[qtype]);
    const auto tile_fn = pick<Out>(k.tile_x4[qtype], k.tile_x4_exact[qtype]);
    // no SIMD x4 kernel (the scalar reference is forced): unpack each group to GGUF rows
    // and run the reference rows kernel on the plain activation
    const bool reference = rows == nullptr;
    const int nb = int(K / ti->block_elems);
    const size_t gstride = size_t(wp.size(1)), row_bytes = size_t(nb) * ti->block_bytes;

    const ActKind act_kind = reference ? ti->act : quant::x4_act_kind(ti->act, M);
    const size_t act_bytes = quant::act_row_bytes(act_kind, K);
    const uint8_t* act = prepare_activation(x, act_kind, k);

    const uint8_t* wp_ = wp.data_ptr<uint8_t>();
    Out* yp = y.data_ptr<Out>();
    // groups [g0, g1) of rows all < n, into y (row stride ys)
    auto run_groups = [&](int64_t g0, int64_t g1, Out* yb, size_t ys) {
        const int ng = int(g1 - g0);
        const uint8_t* wg = wp_ + g0 * gstride;
        if (reference) {
            thread_local std::vector<uint8_t> rows_buf;
            uint8_t* buf = scratch(rows_buf, 4 * row_bytes);
            const Kernels& ref = quant::scalar_kernels();
            const auto ref_rows = pick<Out>(ref.rows[qtype], ref.rows_exact[qtype]);
            for (int g = 0; g < ng; ++g) {
                quant::unpack_x4(qtype, wg + g * gstride, 4, nb, buf);
                for (int64_t m = 0; m < M; ++m) ref_rows(nb, buf, row_bytes, 4, act + m * act_bytes, yb + m * ys + 4 * g);
            }
        } else if (M >= 2) {
            for (int64_t m0 = 0; m0 < M; m0 += kActRowsPerPass) {
                const int mr = int(std::min<int64_t>(kActRowsPerPass, M - m0));
                tile_fn(nb, wg, gstride, ng, act + m0 * act_bytes, act_bytes, mr, yb + m0 * ys, ys);
            }
        } else {
            rows(nb, wg, gstride, ng, act, yb);
        }
    };
    const int64_t full = n / 4;
    const int64_t tile = std::max<int64_t>(1, kTileBytes / int64_t(gstride));
    const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, int64_t(gstride) * M));
    at::parallel_for(0, full, grain, [&](int64_t g0, int64_t g1) {
        if (M == 1) return run_groups(g0, g1, yp + 4 * g0, size_t(n));  // the kernel's streams span the range
        for (int64_t t0 = g0; t0 < g1; t0 += tile) run_groups(t0, std::min(g1, t0 + tile), yp + 4 * t0, size_t(n));
    });
    if (n % 4 != 0) {
        std::vector<Out> tail(size_t(M) * 4);
        run_groups(full, full + 1, tail.data(), 4);
        for (int64_t m = 0; m < M; ++m)
            for (int64_t r = 0; r < n % 4; ++r) yp[m * n + 4 * full + r] = tail[m * 4 + r];
    }
    return finish<Out>(x, y);
}

}  // namespace

at::Tensor pack_x4(const at::Tensor& w, int64_t qtype) {
    const TypeInfo* ti = check_x4_type("pack_x4", qtype);
    TORCH_CHECK(w.device().is_cpu() && w.scalar_type() == at::kByte && w.dim() == 2 && w.is_contiguous(),
                "pack_x4: w must be contiguous CPU uint8 raw GGUF rows [N, row_bytes], got ", w.scalar_type(), " ",
                w.sizes());
    TORCH_CHECK(w.size(1) % ti->block_bytes == 0, "pack_x4: ", w.size(1), " bytes per row is not whole ", ti->name,
                " blocks of ", ti->block_bytes, " bytes");
    const int64_t N = w.size(0);
    const int nb = int(w.size(1) / ti->block_bytes);
    at::Tensor out = empty_weight({(N + 3) / 4, int64_t(nb) * quant::x4_group_bytes(qtype)});
    const uint8_t* src = w.data_ptr<uint8_t>();
    uint8_t* dst = out.data_ptr<uint8_t>();
    const size_t rb = size_t(w.size(1)), gb = size_t(out.size(1));
    at::parallel_for(0, out.size(0), 64, [&](int64_t g0, int64_t g1) {
        quant::pack_x4(qtype, src + g0 * 4 * rb, rb, std::min<int64_t>(N, 4 * g1) - 4 * g0, nb, dst + g0 * gb);
    });
    return out;
}

at::Tensor unpack_x4(const at::Tensor& wp, int64_t qtype, int64_t n) {
    const TypeInfo* ti = check_x4_type("unpack_x4", qtype);
    TORCH_CHECK(wp.dim() == 2 && wp.size(1) % quant::x4_group_bytes(qtype) == 0, "unpack_x4: packed ", ti->name,
                " weight must be [groups, nb * ", quant::x4_group_bytes(qtype), "], got ", wp.sizes());
    const int nb = int(wp.size(1) / quant::x4_group_bytes(qtype));
    check_x4_weight("unpack_x4", wp, ti, qtype, int64_t(nb) * ti->block_elems, n);
    at::Tensor rows = at::empty({n, int64_t(nb) * ti->block_bytes}, wp.options());
    quant::unpack_x4(qtype, wp.data_ptr<uint8_t>(), n, nb, rows.data_ptr<uint8_t>());
    return rows;
}

at::Tensor quant_matmul_x4(const at::Tensor& x, const at::Tensor& wp, int64_t qtype, int64_t n) {
    return run_quant_matmul_x4<float>(x, wp, qtype, n);
}

at::Tensor quant_matmul_x4_exact(const at::Tensor& x, const at::Tensor& wp, int64_t qtype, int64_t n,
                                 bool to_float32) {
    at::Tensor y = run_quant_matmul_x4<double>(x, wp, qtype, n);
    return to_float32 ? y.to(at::kFloat) : y;
}

at::Tensor quant_matmul(const at::Tensor& x, const at::Tensor& w, int64_t qtype) {
    return run_quant_matmul<float>(x, w, qtype);
}

at::Tensor quant_matmul_exact(const at::Tensor& x, const at::Tensor& w, int64_t qtype, bool to_float32) {
    at::Tensor y = run_quant_matmul<double>(x, w, qtype);
    return to_float32 ? y.to(at::kFloat) : y;
}

}  // namespace tp_numa
