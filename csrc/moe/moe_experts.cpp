// moe_experts (moe_ops.h): the routed experts of one layer on this rank's slices.
//
// Decode (T = 1): one call for the k chosen experts, threads spread over (expert, row
// chunk) work items so every core is busy for any k and any slice width:
//   1. x prepared once per activation form (8-bit blocks for the gate and up types);
//   2. gate and up rows of all k experts: one parallel pass over row chunks (chunk_rows);
//   3. h_j = act(gate_j) * up_j, prepared for down's type, one expert per task;
//   4. down rows of all k experts (Exact, float64): one parallel pass over row chunks;
//   5. y = sum_j w_j down_j in float64, experts in ascending id order.
// Prefill (T > 1): the (token, expert) pairs grouped by expert; per expert one GEMM with
// its tokens' rows for gate, up and down (the quant_matmul drivers, tiled, threaded), and
// y[t] += w * row, experts in ascending id order.
//
// Batch invariance: a token's y is bitwise the same alone (decode) and among any other
// tokens (prefill). Each row of gate / up / down is the same kernel arithmetic in the GEMV
// and in the GEMM (quant kernels are batch invariant, docs/kernels.md), act(gate) * up is
// one row function, and both paths add the weighted down rows into a zeroed float64 row
// in the same order: ascending expert id (the top-k order cannot be kept by prefill's
// per-expert GEMMs without buffering every (token, expert) row).
#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdlib>
#include <type_traits>
#include <vector>

#include "fused/fused_kernels.h"
#include "moe/moe_ops.h"
#include "quant/kernels.h"
#include "quant/quant_ops.h"

namespace tp_numa {
namespace {

using quant::ActKind;
using quant::Kernels;
using quant::TypeInfo;

// Rows per decode work item (a multiple of 4, the x4 group): about kItemsPerThread items
// per thread, so threads stay balanced over k slices of any width, but at least kMinChunk
// rows, so each kernel call streams long enough runs for its prefetches to pay.
// TP_NUMA_MOE_CHUNK=<rows> fixes the size (for A/B runs).
constexpr int64_t kItemsPerThread = 8, kMinChunk = 64, kMaxChunk = 1024;

int64_t chunk_rows(int64_t total_rows) {
    static const int64_t forced = [] {
        const char* v = std::getenv("TP_NUMA_MOE_CHUNK");
        return v != nullptr ? std::max<int64_t>(4, std::atoll(v) / 4 * 4) : int64_t(0);
    }();
    if (forced > 0) return forced;
    const int64_t want = total_rows / (kItemsPerThread * at::get_num_threads());
    return std::clamp<int64_t>(want / 4 * 4, kMinChunk, kMaxChunk);
}

uint8_t* grow(std::vector<uint8_t>& buf, size_t bytes) {
    if (buf.size() < bytes) buf.resize(bytes + 64);
    return buf.data();
}

// One stacked matrix (gate, up or down) of every expert's slice.
struct ExpertMat {
    const uint8_t* base = nullptr;
    const int64_t* off = nullptr;  // byte offset of expert e's slice
    int64_t bytes = 0;             // of the flat buffer
    int qtype = 0;
    bool x4 = false;
    const TypeInfo* ti = nullptr;

    int nb(int64_t K) const { return int(K / ti->block_elems); }
    // bytes of one row (raw) or one group of four rows (x4) of K inputs
    size_t stride(int64_t K) const {
        return x4 ? size_t(nb(K)) * quant::x4_group_bytes(qtype) : size_t(nb(K)) * ti->block_bytes;
    }
    int64_t slice_bytes(int64_t rows, int64_t K) const { return (x4 ? rows / 4 : rows) * int64_t(stride(K)); }
    // The activation form the rows kernel consumes for one activation row.
    ActKind act_kind(const Kernels& k) const {
        return x4 && k.rows_x4[qtype] != nullptr ? quant::x4_act_kind(ti->act, 1) : ti->act;
    }
};

using quant::pick;

// y[0, r1 - r0) = rows [r0, r1) of expert e's slice (K inputs) dotted with act (the form
// act_kind gives). x4 row bounds are multiples of 4.
template <class Out>
void run_rows(const ExpertMat& m, int64_t e, int64_t K, int64_t r0, int64_t r1, const void* act, Out* y) {
    const Kernels& k = quant::active_kernels();
    const Kernels& ref = quant::scalar_kernels();
    const int nb = m.nb(K);
    const size_t stride = m.stride(K);
    const uint8_t* w = m.base + m.off[e];
    if (m.x4) {
        const auto fn = pick<Out>(k.rows_x4[m.qtype], k.rows_x4_exact[m.qtype]);
        if (fn != nullptr) return fn(nb, w + (r0 / 4) * stride, stride, int((r1 - r0) / 4), act, y);
        // scalar reference forced: unpack each group to four GGUF rows
        thread_local std::vector<uint8_t> rows_buf;
        const size_t row_bytes = size_t(nb) * m.ti->block_bytes;
        uint8_t* buf = grow(rows_buf, 4 * row_bytes);
        const auto ref_rows = pick<Out>(ref.rows[m.qtype], ref.rows_exact[m.qtype]);
        for (int64_t g = r0 / 4; g < r1 / 4; ++g) {
            quant::unpack_x4(m.qtype, w + g * stride, 4, nb, buf);
            ref_rows(nb, buf, row_bytes, 4, act, y + 4 * g - r0);
        }
        return;
    }
    auto fn = pick<Out>(k.rows[m.qtype], k.rows_exact[m.qtype]);
    if (fn == nullptr) fn = pick<Out>(ref.rows[m.qtype], ref.rows_exact[m.qtype]);
    fn(nb, w + r0 * stride, stride, int(r1 - r0), act, y);
}

// Expert e's slice as the 2-D weight quant_matmul[_x4] takes.
at::Tensor slice_view(const at::Tensor& flat, const ExpertMat& m, int64_t e, int64_t rows, int64_t K) {
    const int64_t stride = int64_t(m.stride(K));
    return flat.narrow(0, m.off[e], m.slice_bytes(rows, K)).view({m.x4 ? rows / 4 : rows, stride});
}

// x [M, K] @ slice^T -> float32 [M, rows] (Out = float) or float64 Exact (Out = double).
template <class Out>
at::Tensor slice_matmul(const at::Tensor& flat, const ExpertMat& m, int64_t e, int64_t rows, const at::Tensor& x) {
    const int64_t K = x.size(1);
    at::Tensor w = slice_view(flat, m, e, rows, K);
    if constexpr (std::is_same_v<Out, double>) {
        return m.x4 ? quant_matmul_x4_exact(x, w, m.qtype, rows, false) : quant_matmul_exact(x, w, m.qtype, false);
    } else {
        return m.x4 ? quant_matmul_x4(x, w, m.qtype, rows) : quant_matmul(x, w, m.qtype);
    }
}

struct Item {
    int j;        // index among the chosen experts with a slice here
    int mat;      // 0 gate, 1 up, 2 down
    int64_t r0, r1;
};

void add_items(std::vector<Item>& items, int j, int mat, int64_t rows, int64_t chunk) {
    for (int64_t r0 = 0; r0 < rows; r0 += chunk) items.push_back({j, mat, r0, std::min(rows, r0 + chunk)});
}

at::Tensor experts_decode(const at::Tensor& x, const int64_t* ids, const float* wts, int64_t k,
                          const ExpertMat* mats, const int64_t* ff, bool gelu) {
    const int64_t d = x.size(1);
    at::Tensor y = at::zeros({1, d}, x.options().dtype(at::kDouble));
    std::vector<int64_t> es;
    std::vector<double> ws;
    for (int64_t j = 0; j < k; ++j) {
        if (ff[ids[j]] > 0) {
            es.push_back(ids[j]);
            ws.push_back(double(wts[j]));
        }
    }
    const int nj = int(es.size());
    if (nj == 0) return y;  // this rank holds no slice of the chosen experts
    const Kernels& kern = quant::active_kernels();
    const fused::Kernels& fk = fused::active_kernels();

    // 1. x in the activation forms of gate and up
    const ActKind kg = mats[0].act_kind(kern), ku = mats[1].act_kind(kern);
    std::vector<uint8_t> act_g(quant::act_row_bytes(kg, d) + 64), act_u;
    quant::prepare_row(kern, kg, x.data_ptr<float>(), d, act_g.data());
    if (ku != kg) {
        act_u.resize(quant::act_row_bytes(ku, d) + 64);
        quant::prepare_row(kern, ku, x.data_ptr<float>(), d, act_u.data());
    }
    const uint8_t* acts[2] = {act_g.data(), ku != kg ? act_u.data() : act_g.data()};

    // 2. gate and up of every chosen expert: gu[j] = [gate (ff) | up (ff)]
    std::vector<int64_t> gu_off(nj + 1, 0);
    for (int j = 0; j < nj; ++j) gu_off[j + 1] = gu_off[j] + 2 * ff[es[j]];
    std::vector<float> gu(static_cast<size_t>(gu_off[nj]));
    std::vector<Item> items;
    const int64_t gu_chunk = chunk_rows(gu_off[nj]);
    for (int j = 0; j < nj; ++j) {
        add_items(items, j, 0, ff[es[j]], gu_chunk);
        add_items(items, j, 1, ff[es[j]], gu_chunk);
    }
    at::parallel_for(0, int64_t(items.size()), 1, [&](int64_t i0, int64_t i1) {
        for (int64_t i = i0; i < i1; ++i) {
            const Item& it = items[i];
            const int64_t f = ff[es[it.j]];
            run_rows<float>(mats[it.mat], es[it.j], d, it.r0, it.r1, acts[it.mat],
                            gu.data() + gu_off[it.j] + it.mat * f + it.r0);
        }
    });

    // 3. h_j = act(gate_j) * up_j in down's activation form
    const ActKind kd = mats[2].act_kind(kern);
    std::vector<int64_t> h_off(nj + 1, 0);
    for (int j = 0; j < nj; ++j) h_off[j + 1] = h_off[j] + int64_t(quant::act_row_bytes(kd, ff[es[j]]));
    std::vector<uint8_t> hact(static_cast<size_t>(h_off[nj]) + 64);
    at::parallel_for(0, nj, 1, [&](int64_t j0, int64_t j1) {
        thread_local std::vector<uint8_t> hbuf;
        for (int64_t j = j0; j < j1; ++j) {
            const int64_t f = ff[es[j]];
            float* h = reinterpret_cast<float*>(grow(hbuf, size_t(f) * sizeof(float)));
            const float* g = gu.data() + gu_off[j];
            fk.act_mul_row(g, g + f, f, gelu, h);
            quant::prepare_row(kern, kd, h, f, hact.data() + h_off[j]);
        }
    });

    // 4. down of every chosen expert: dn[j] = down_j(h_j), float64 [d]
    std::vector<double> dn(size_t(nj) * d);
    items.clear();
    const int64_t down_chunk = chunk_rows(nj * d);
    for (int j = 0; j < nj; ++j) add_items(items, j, 2, d, down_chunk);
    at::parallel_for(0, int64_t(items.size()), 1, [&](int64_t i0, int64_t i1) {
        for (int64_t i = i0; i < i1; ++i) {
            const Item& it = items[i];
            run_rows<double>(mats[2], es[it.j], ff[es[it.j]], it.r0, it.r1, hact.data() + h_off[it.j],
                             dn.data() + it.j * d + it.r0);
        }
    });

    // 5. weighted sum, experts in ascending id order (experts_prefill's order)
    std::vector<int> order(nj);
    for (int j = 0; j < nj; ++j) order[j] = j;
    std::stable_sort(order.begin(), order.end(), [&](int a, int b) { return es[a] < es[b]; });  // repeats: top-k order, as prefill
    double* yp = y.data_ptr<double>();
    for (const int j : order) {
        const double w = ws[j];
        const double* dj = dn.data() + j * d;
        for (int64_t c = 0; c < d; ++c) yp[c] += w * dj[c];
    }
    return y;
}

at::Tensor experts_prefill(const at::Tensor& x, const at::Tensor& ids, const at::Tensor& wts,
                           const std::vector<at::Tensor>& flats, const ExpertMat* mats, const int64_t* ff,
                           int64_t n_expert, bool gelu) {
    const int64_t T = x.size(0), d = x.size(1), k = ids.size(1);
    at::Tensor y = at::zeros({T, d}, x.options().dtype(at::kDouble));
    // (token, weight) pairs of each expert, tokens ascending
    std::vector<std::vector<std::pair<int64_t, double>>> by_expert(n_expert);
    const int64_t* ip = ids.data_ptr<int64_t>();
    const float* wp = wts.data_ptr<float>();
    for (int64_t t = 0; t < T; ++t)
        for (int64_t j = 0; j < k; ++j) {
            const int64_t e = ip[t * k + j];
            if (ff[e] > 0) by_expert[e].push_back({t, double(wp[t * k + j])});
        }
    double* yp = y.data_ptr<double>();
    for (int64_t e = 0; e < n_expert; ++e) {
        const auto& pairs = by_expert[e];
        if (pairs.empty()) continue;
        const int64_t n = int64_t(pairs.size()), f = ff[e];
        at::Tensor rows = at::empty({n}, ids.options());
        for (int64_t i = 0; i < n; ++i) rows.data_ptr<int64_t>()[i] = pairs[i].first;
        at::Tensor xe = x.index_select(0, rows).contiguous();   // [n, d]
        at::Tensor g = slice_matmul<float>(flats[0], mats[0], e, f, xe);   // [n, f]
        at::Tensor u = slice_matmul<float>(flats[1], mats[1], e, f, xe);
        at::Tensor h = at::empty({n, f}, x.options());
        const fused::Kernels& fk = fused::active_kernels();
        const float *gp = g.data_ptr<float>(), *up = u.data_ptr<float>();
        float* hp = h.data_ptr<float>();
        at::parallel_for(0, n, std::max<int64_t>(1, 16384 / f), [&](int64_t a, int64_t b) {
            for (int64_t i = a; i < b; ++i) fk.act_mul_row(gp + i * f, up + i * f, f, gelu, hp + i * f);
        });
        at::Tensor dn = slice_matmul<double>(flats[2], mats[2], e, d, h);   // [n, d] float64
        const double* dp = dn.data_ptr<double>();
        for (int64_t i = 0; i < n; ++i) {
            double* yt = yp + pairs[i].first * d;
            const double w = pairs[i].second;
            for (int64_t c = 0; c < d; ++c) yt[c] += w * dp[i * d + c];
        }
    }
    return y;
}

}  // namespace

at::Tensor moe_experts(const at::Tensor& x, const at::Tensor& ids, const at::Tensor& weights,
                       const std::vector<at::Tensor>& mats, const at::Tensor& offsets, const at::Tensor& ff,
                       const std::vector<int64_t>& qtypes, const std::vector<int64_t>& layouts, bool gelu) {
    TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat && x.dim() == 2 && x.is_contiguous(),
                "moe_experts: x must be a contiguous float32 CPU tensor [T, d], got ", x.scalar_type(), " ", x.sizes());
    const int64_t T = x.size(0), d = x.size(1);
    TORCH_CHECK(ids.scalar_type() == at::kLong && ids.dim() == 2 && ids.size(0) == T && ids.is_contiguous(),
                "moe_experts: ids must be a contiguous int64 tensor [", T, ", k], got ", ids.scalar_type(), " ",
                ids.sizes());
    TORCH_CHECK(weights.scalar_type() == at::kFloat && weights.sizes() == ids.sizes() && weights.is_contiguous(),
                "moe_experts: weights must be a contiguous float32 tensor shaped like ids ", ids.sizes());
    TORCH_CHECK(mats.size() == 3 && qtypes.size() == 3 && layouts.size() == 3,
                "moe_experts: mats, qtypes and layouts must be [gate, up, down]");
    TORCH_CHECK(ff.scalar_type() == at::kLong && ff.dim() == 1 && ff.is_contiguous(),
                "moe_experts: ff must be a contiguous int64 tensor [n_expert]");
    const int64_t E = ff.size(0);
    TORCH_CHECK(offsets.scalar_type() == at::kLong && offsets.dim() == 2 && offsets.size(0) == 3 &&
                    offsets.size(1) == E && offsets.is_contiguous(),
                "moe_experts: offsets must be a contiguous int64 tensor [3, ", E, "]");
    static const char* names[] = {"gate", "up", "down"};
    ExpertMat m[3];
    const int64_t* fp = ff.data_ptr<int64_t>();
    for (int i = 0; i < 3; ++i) {
        const at::Tensor& t = mats[i];
        TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kByte && t.dim() == 1 && t.is_contiguous(),
                    "moe_experts: ", names[i], " must be a flat contiguous uint8 CPU tensor, got ", t.scalar_type(), " ",
                    t.sizes());
        m[i].ti = quant::type_info(qtypes[i]);
        TORCH_CHECK(m[i].ti != nullptr, "moe_experts: ", names[i], " has unsupported GGML type id ", qtypes[i]);
        m[i].x4 = layouts[i] != 0;
        TORCH_CHECK(!m[i].x4 || quant::x4_group_bytes(qtypes[i]) > 0, "moe_experts: ", names[i], " type ",
                    m[i].ti->name, " has no x4 layout");
        m[i].base = t.data_ptr<uint8_t>();
        m[i].off = offsets.data_ptr<int64_t>() + i * E;
        m[i].bytes = t.numel();
        m[i].qtype = int(qtypes[i]);
    }
    TORCH_CHECK(d % m[0].ti->block_elems == 0 && d % m[1].ti->block_elems == 0, "moe_experts: d=", d,
                " is not whole blocks of the gate/up types");
    for (int64_t e = 0; e < E; ++e) {
        const int64_t f = fp[e];
        TORCH_CHECK(f >= 0, "moe_experts: ff[", e, "] is negative");
        if (f == 0) continue;
        TORCH_CHECK(f % m[2].ti->block_elems == 0, "moe_experts: expert ", e, " slice of ", f,
                    " rows is not whole ", m[2].ti->name, " blocks of down");
        const int64_t rows[3] = {f, f, d}, K[3] = {d, d, f};
        for (int i = 0; i < 3; ++i) {
            TORCH_CHECK(!m[i].x4 || rows[i] % 4 == 0, "moe_experts: x4 ", names[i], " of expert ", e, " has ", rows[i],
                        " rows (not a multiple of 4)");
            TORCH_CHECK(m[i].off[e] >= 0 && m[i].off[e] + m[i].slice_bytes(rows[i], K[i]) <= m[i].bytes,
                        "moe_experts: ", names[i], " slice of expert ", e, " lies outside its buffer");
        }
    }
    const int64_t k = ids.size(1);
    const int64_t* ip = ids.data_ptr<int64_t>();
    for (int64_t i = 0; i < T * k; ++i)
        TORCH_CHECK(ip[i] >= 0 && ip[i] < E, "moe_experts: expert id ", ip[i], " outside [0, ", E, ")");
    if (T == 0) return at::zeros({0, d}, x.options().dtype(at::kDouble));
    if (T == 1) return experts_decode(x, ip, weights.data_ptr<float>(), k, m, fp, gelu);
    return experts_prefill(x, ids, weights, mats, m, fp, E, gelu);
}

}  // namespace tp_numa
