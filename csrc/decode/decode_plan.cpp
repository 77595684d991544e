// DecodePlan (decode_plan.h): the decode step of a rank's decoder layers in one native call.
// Every step below is the same C++ entry point the matching nn.Module calls (quant, fused,
// attention, shm ops), in the same order, so results are bitwise the module path's.
#include "decode/decode_plan.h"

#include <ATen/record_function.h>
#include <c10/util/Exception.h>

#include "attention/attention_ops.h"
#include "comm/shm_ops.h"
#include "fused/fused_ops.h"
#include "moe/moe_ops.h"
#include "quant/quant_ops.h"

namespace tp_numa {
namespace {

void check_vector(const at::Tensor& t, int64_t n, const char* what) {
    TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat && t.is_contiguous() && t.dim() == 1 &&
                    t.size(0) == n,
                "DecodePlan: ", what, " must be a contiguous float32 CPU tensor [", n, "], got ", t.scalar_type(), " ",
                t.sizes());
}

const char* linear_name(int64_t which) {
    static const char* names[] = {"qkv", "o_proj", "gate_up", "down", "router", "shared_gate"};
    return names[which];
}

}  // namespace

DecodePlan::DecodePlan(int64_t d_model, double eps, int64_t shm_handle)
    : d_model_(d_model), eps_(eps), shm_handle_(shm_handle) {
    TORCH_CHECK(d_model > 0, "DecodePlan: d_model must be positive, got ", d_model);
}

void DecodePlan::add_layer(std::vector<at::Tensor> norms, std::vector<at::Tensor> qk_norms, std::vector<int64_t> heads,
                           int64_t rope_index, bool neox, double scale, at::Tensor k_cache, at::Tensor v_cache,
                           bool gelu) {
    TORCH_CHECK(norms.size() == 2 || norms.size() == 4, "DecodePlan: 2 (pre-norm) or 4 (sandwich) norms, got ",
                norms.size());
    TORCH_CHECK(heads.size() == 3 && heads[0] > 0 && heads[1] > 0 && heads[2] > 0 && heads[0] % heads[1] == 0,
                "DecodePlan: heads must be [n_q, n_kv, head_dim] with n_q a multiple of n_kv");
    TORCH_CHECK(qk_norms.empty() || qk_norms.size() == 2, "DecodePlan: qk_norms must be [] or [q_norm, k_norm]");
    TORCH_CHECK(rope_index >= 0, "DecodePlan: negative rope index");
    PlanLayer L;
    L.sandwich = norms.size() == 4;
    for (const auto& n : norms) check_vector(n, d_model_, "layer norm weight");
    L.attn_norm = norms[0];
    if (L.sandwich) {
        L.post_attn_norm = norms[1];
        L.ffn_norm = norms[2];
        L.post_ffn_norm = norms[3];
    } else {
        L.ffn_norm = norms[1];
    }
    L.n_q = heads[0];
    L.n_kv = heads[1];
    L.head_dim = heads[2];
    if (!qk_norms.empty()) {
        check_vector(qk_norms[0], L.head_dim, "q_norm weight");
        check_vector(qk_norms[1], L.head_dim, "k_norm weight");
        L.q_norm = qk_norms[0];
        L.k_norm = qk_norms[1];
    }
    // a Q8_0 cache (uint8) holds head_dim / 32 blocks of 34 bytes per row
    const int64_t row = k_cache.scalar_type() == at::kByte ? L.head_dim / 32 * 34 : L.head_dim;
    for (const at::Tensor* c : {&k_cache, &v_cache}) {
        TORCH_CHECK(c->device().is_cpu() && c->is_contiguous() && c->dim() == 4 && c->size(0) > 0 && c->size(1) > 0 &&
                        c->size(2) == L.n_kv && c->size(3) == row,
                    "DecodePlan: KV cache must be a contiguous CPU tensor [n_seqs, slots, ", L.n_kv, ", ", row,
                    "], got ", c->sizes());
    }
    TORCH_CHECK(k_cache.sizes() == v_cache.sizes() && k_cache.scalar_type() == v_cache.scalar_type(),
                "DecodePlan: K and V caches differ");
    TORCH_CHECK(n_seqs_ == 0 || k_cache.size(0) == n_seqs_, "DecodePlan: layer ", layers_.size(), "'s KV cache holds ",
                k_cache.size(0), " sequences, the layers before it ", n_seqs_);
    n_seqs_ = k_cache.size(0);
    L.rope_index = rope_index;
    L.neox = neox;
    L.scale = scale;
    L.k_cache = std::move(k_cache);
    L.v_cache = std::move(v_cache);
    L.gelu = gelu;
    layers_.push_back(std::move(L));
}

void DecodePlan::set_linear(int64_t which, std::vector<at::Tensor> weights, std::vector<int64_t> qtypes,
                            std::vector<int64_t> rows, std::vector<int64_t> layouts, std::optional<at::Tensor> bias,
                            bool exact, bool reduce) {
    TORCH_CHECK(!layers_.empty(), "DecodePlan: set_linear before add_layer");
    TORCH_CHECK(which >= 0 && which < 6, "DecodePlan: linear index must be 0..5, got ", which);
    TORCH_CHECK(which < 4 || layers_.back().moe.has_value(), "DecodePlan: ", linear_name(which),
                " of a layer without set_moe");
    TORCH_CHECK(!weights.empty() && weights.size() == qtypes.size() && weights.size() == rows.size() &&
                    weights.size() == layouts.size(),
                "DecodePlan: ", linear_name(which), ": weights, qtypes, rows and layouts must have one entry per run");
    TORCH_CHECK(!reduce || shm_handle_ >= 0, "DecodePlan: ", linear_name(which),
                " reduces over ranks but the plan has no shm group");
    PlanLayer& L = layers_.back();
    if (which == 5) L.moe->shared_gate.emplace();
    PlanLinear* lin[] = {&L.qkv, &L.o_proj, &L.gate_up, &L.down, L.moe ? &L.moe->router : nullptr,
                         L.moe && L.moe->shared_gate ? &*L.moe->shared_gate : nullptr};
    PlanLinear& P = *lin[which];
    P = PlanLinear();
    int64_t out = 0;  // output rows of all runs
    for (size_t i = 0; i < weights.size(); ++i) {
        TORCH_CHECK(weights[i].device().is_cpu() && weights[i].scalar_type() == at::kByte &&
                        weights[i].is_contiguous() && weights[i].dim() == 2 && rows[i] > 0,
                    "DecodePlan: ", linear_name(which), " run ", i, " must be a contiguous uint8 CPU weight");
        P.runs.push_back({weights[i], qtypes[i], rows[i], layouts[i] != 0});
        out += rows[i];
    }
    if (bias.has_value()) {
        check_vector(*bias, out, "linear bias");
        P.bias = bias;
    }
    P.exact = exact;
    P.reduce = reduce;
    const int64_t want[] = {(L.n_q + 2 * L.n_kv) * L.head_dim, d_model_, -1, d_model_,
                            L.moe ? L.moe->ff.size(0) : -1, 1};
    TORCH_CHECK(want[which] < 0 || out == want[which], "DecodePlan: ", linear_name(which), " has ", out,
                " output rows, expected ", want[which]);
    TORCH_CHECK(which != 2 || out % 2 == 0, "DecodePlan: gate_up needs equal gate and up halves");
}

void DecodePlan::set_moe(int64_t k, int64_t gating, bool norm, double scale, int64_t n_groups, int64_t groups_used,
                         std::vector<at::Tensor> mats, at::Tensor offsets, at::Tensor ff, std::vector<int64_t> qtypes,
                         std::vector<int64_t> layouts, bool has_shared, bool reduce,
                         std::optional<at::Tensor> counts) {
    TORCH_CHECK(!layers_.empty(), "DecodePlan: set_moe before add_layer");
    TORCH_CHECK(mats.size() == 3 && qtypes.size() == 3 && layouts.size() == 3,
                "DecodePlan: set_moe needs [gate, up, down] buffers, qtypes and layouts");
    TORCH_CHECK(ff.scalar_type() == at::kLong && ff.dim() == 1 && k >= 1 && k <= ff.size(0),
                "DecodePlan: set_moe: k=", k, " experts of ff ", ff.sizes());
    TORCH_CHECK(!reduce || shm_handle_ >= 0, "DecodePlan: the MoE block reduces over ranks but the plan has no shm group");
    TORCH_CHECK(!counts.has_value() || (counts->scalar_type() == at::kLong && counts->numel() == ff.size(0)),
                "DecodePlan: set_moe: counts must be int64 [n_expert]");
    PlanMoE M;
    M.k = k;
    M.gating = gating;
    M.norm = norm;
    M.scale = scale;
    M.n_groups = n_groups;
    M.groups_used = groups_used;
    M.mats = std::move(mats);
    M.offsets = std::move(offsets);
    M.ff = std::move(ff);
    M.qtypes = std::move(qtypes);
    M.layouts = std::move(layouts);
    M.has_shared = has_shared;
    M.reduce = reduce;
    M.counts = std::move(counts);
    layers_.back().moe = std::move(M);
}

at::Tensor DecodePlan::matmul(const PlanLinear& lin, const at::Tensor& x) const {
    auto one = [&](const PlanLinear::Run& r) {
        return r.x4 ? quant_matmul_x4(x, r.w, r.qtype, r.rows) : quant_matmul(x, r.w, r.qtype);
    };
    at::Tensor y;
    if (lin.runs.size() == 1) {
        y = one(lin.runs[0]);
    } else {
        std::vector<at::Tensor> ys;
        ys.reserve(lin.runs.size());
        for (const auto& r : lin.runs) ys.push_back(one(r));
        y = at::cat(ys, 1);
    }
    return y;
}

at::Tensor DecodePlan::column(const PlanLinear& lin, const at::Tensor& x) const {
    at::Tensor y = matmul(lin, x);
    if (lin.bias.has_value()) y.add_(*lin.bias);  // y is fresh: in place
    return y;
}

at::Tensor DecodePlan::row(const PlanLinear& lin, const at::Tensor& x) const {
    // RowParallelLinear.forward: exact partials for a single run, all-reduce, float32, bias
    const bool exact = lin.exact && lin.runs.size() == 1;
    at::Tensor y;
    if (exact) {
        const auto& r = lin.runs[0];
        y = r.x4 ? quant_matmul_x4_exact(x, r.w, r.qtype, r.rows, !lin.reduce)
                 : quant_matmul_exact(x, r.w, r.qtype, !lin.reduce);
    } else {
        y = matmul(lin, x);
    }
    if (lin.reduce) {
        RECORD_FUNCTION("native_decode::all_reduce", std::vector<c10::IValue>());
        shm_all_reduce(y, shm_handle_);
    }
    if (exact && y.scalar_type() != at::kFloat) y = y.to(at::kFloat);
    if (lin.bias.has_value()) y.add_(*lin.bias);
    return y;
}

at::Tensor DecodePlan::partial(const PlanLinear& lin, const at::Tensor& x) const {
    // RowParallelLinear.partial: float64 exact partials of a single run, else float32 widened
    if (lin.exact && lin.runs.size() == 1) {
        const auto& r = lin.runs[0];
        return r.x4 ? quant_matmul_x4_exact(x, r.w, r.qtype, r.rows, false) : quant_matmul_exact(x, r.w, r.qtype, false);
    }
    return matmul(lin, x).to(at::kDouble);
}

at::Tensor DecodePlan::attention(const PlanLayer& L, const at::Tensor& xn, const Rows& rows, const at::Tensor& cos,
                                 const at::Tensor& sin) const {
    // SelfAttention.forward + Attention.forward on a SeqBatch of one-token spans
    const int64_t M = xn.size(0);
    at::Tensor qkv;
    {
        RECORD_FUNCTION("native_decode::qkv_proj", std::vector<c10::IValue>());
        qkv = column(L.qkv, xn);  // [M, (n_q + 2 n_kv) hd]
    }
    auto parts = qkv.view({M, -1, L.head_dim}).split_with_sizes({L.n_q, L.n_kv, L.n_kv}, 1);
    at::Tensor q = parts[0], k = parts[1], v = parts[2];  // [M, heads, hd] views of qkv
    if (L.q_norm.has_value()) {
        // the per-head norm on contiguous rows (for M > 1 the views are strided by qkv's row)
        q = rms_norm(q.contiguous(), *L.q_norm, eps_);
        k = rms_norm(k.contiguous(), *L.k_norm, eps_);
    }
    rope_(q, cos, sin, L.neox);  // row m rotated by cos/sin row m
    rope_(k, cos, sin, L.neox);
    const int64_t slots = L.k_cache.size(1);
    at::Tensor out;
    {
        RECORD_FUNCTION("native_decode::attention", std::vector<c10::IValue>());
        std::vector<at::Tensor> outs;
        outs.reserve(M);
        for (int64_t m = 0; m < M; ++m) {
            const int64_t p = rows.pos[m];
            at::Tensor kc = L.k_cache.select(0, rows.seq[m]), vc = L.v_cache.select(0, rows.seq[m]);  // [slots, n_kv, row]
            outs.push_back(attn_decode_update(q[m], k[m], v[m], kc, vc, p % slots, std::min(p + 1, slots), L.scale)
                               .view({1, -1}));
        }
        out = M == 1 ? outs[0] : at::cat(outs, 0);  // [M, n_q hd]
    }
    RECORD_FUNCTION("native_decode::o_proj", std::vector<c10::IValue>());
    return row(L.o_proj, out);
}

at::Tensor DecodePlan::moe_ffn(const PlanLayer& L, const at::Tensor& y) const {
    // MoE.forward: route, the experts' partial, the shared expert's, one all-reduce, float32
    const PlanMoE& M = *L.moe;
    at::Tensor out;
    {
        RECORD_FUNCTION("native_decode::moe_experts", std::vector<c10::IValue>());
        at::Tensor logits = column(M.router, y);  // [M, n_expert]
        auto [ids, w] = moe_route(logits, std::nullopt, M.k, M.gating, M.norm, M.scale, M.n_groups, M.groups_used);
        if (M.counts.has_value()) {
            at::Tensor flat = ids.reshape({-1});
            M.counts->index_add_(0, flat, at::ones_like(flat));
        }
        out = moe_experts(y, ids, w, M.mats, M.offsets, M.ff, M.qtypes, M.layouts, L.gelu);  // [M, d] float64
    }
    if (M.has_shared) {
        RECORD_FUNCTION("native_decode::shared_expert", std::vector<c10::IValue>());
        at::Tensor s = partial(L.down, act_mul(column(L.gate_up, y), L.gelu));
        if (M.shared_gate.has_value()) s = s * at::sigmoid(column(*M.shared_gate, y)).to(at::kDouble);
        out.add_(s);
    }
    if (M.reduce) {
        RECORD_FUNCTION("native_decode::all_reduce", std::vector<c10::IValue>());
        shm_all_reduce(out, shm_handle_);
    }
    return out.to(at::kFloat);
}

at::Tensor DecodePlan::mlp(const PlanLayer& L, const at::Tensor& y) const {
    if (L.moe.has_value()) return moe_ffn(L, y);
    at::Tensor gu;
    {
        RECORD_FUNCTION("native_decode::gate_up_proj", std::vector<c10::IValue>());
        gu = column(L.gate_up, y);  // [M, 2 f] = [gate | up]
    }
    at::Tensor hidden = act_mul(gu, L.gelu);
    RECORD_FUNCTION("native_decode::down_proj", std::vector<c10::IValue>());
    return row(L.down, hidden);
}

at::Tensor DecodePlan::layer_forward(const PlanLayer& L, const at::Tensor& x, const Rows& rows, const at::Tensor& cos,
                                     const at::Tensor& sin) const {
    at::Tensor a = attention(L, rms_norm(x, L.attn_norm, eps_), rows, cos, sin);
    if (!L.sandwich) {
        at::Tensor y = add_rms_norm_(a, x, L.ffn_norm, eps_, std::nullopt);  // a <- h = x + a
        return mlp(L, y).add_(a);
    }
    at::Tensor h = x.clone();
    at::Tensor y = add_rms_norm_(h, a, L.ffn_norm, eps_, L.post_attn_norm);  // h <- x + norm(a)
    at::Tensor m = mlp(L, y);
    return h.add_(rms_norm(m, *L.post_ffn_norm, eps_));
}

at::Tensor DecodePlan::forward(const at::Tensor& x, std::vector<int64_t> pos, std::vector<int64_t> seq,
                               std::vector<at::Tensor> cos, std::vector<at::Tensor> sin) {
    RECORD_FUNCTION("tp_numa::decode_layers", std::vector<c10::IValue>());
    TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat && x.is_contiguous() && x.dim() == 2 &&
                    x.size(0) >= 1 && x.size(1) == d_model_,
                "DecodePlan: x must be a contiguous float32 CPU tensor [M, ", d_model_, "] with M >= 1, got ",
                x.scalar_type(), " ", x.sizes());
    const int64_t M = x.size(0);
    TORCH_CHECK(static_cast<int64_t>(pos.size()) == M && static_cast<int64_t>(seq.size()) == M, "DecodePlan: ", M,
                " rows need ", M, " positions and sequences, got ", pos.size(), " and ", seq.size());
    for (int64_t m = 0; m < M; ++m) {
        TORCH_CHECK(pos[m] >= 0, "DecodePlan: row ", m, ": negative position ", pos[m]);
        TORCH_CHECK(seq[m] >= 0 && seq[m] < n_seqs_, "DecodePlan: row ", m, ": KV sequence ", seq[m],
                    " does not exist (the caches hold ", n_seqs_, ")");
        for (int64_t j = 0; j < m; ++j) {
            TORCH_CHECK(seq[j] != seq[m], "DecodePlan: rows ", j, " and ", m, " are both of KV sequence ", seq[m],
                        " (one token per sequence and step)");
        }
    }
    TORCH_CHECK(cos.size() == sin.size(), "DecodePlan: ", cos.size(), " cos tables but ", sin.size(), " sin tables");
    for (size_t j = 0; j < cos.size(); ++j) {
        TORCH_CHECK(cos[j].dim() == 2 && cos[j].size(0) == M && cos[j].sizes() == sin[j].sizes(), "DecodePlan: rope ",
                    j, ": cos/sin must be [", M, ", rope_dim/2] (a row per token), got ", cos[j].sizes(), " and ",
                    sin[j].sizes());
    }
    for (const auto& L : layers_) {
        TORCH_CHECK(L.rope_index < static_cast<int64_t>(cos.size()), "DecodePlan: layer needs rope table ",
                    L.rope_index, ", given ", cos.size());
    }
    const Rows rows{pos, seq};
    at::Tensor h = x;
    for (const auto& L : layers_) h = layer_forward(L, h, rows, cos[L.rope_index], sin[L.rope_index]);
    return h;
}

}  // namespace tp_numa
