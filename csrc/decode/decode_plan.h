// A native decode step over a rank's decoder layers: one call runs every layer of M tokens,
// each the next token of its own KV sequence (continuous batching: M running requests).
//
// Why: a decode step of a 0.5B model is ~24 layers x ~12 small native calls. From Python
// each call costs module dispatch, attribute lookups and a torch op dispatch; together that
// was 3.7-6.4 ms of a 26-28 ms step at 2 threads (scripts/profile_decode.py). The plan holds
// the same tensors the nn.Modules hold (weights, norms, KV caches; no copies) and calls the
// same C++ entry points on the same tensors in the same order, so its output is bitwise the
// module path's (DecoderModel.forward with a SeqBatch of M one-token spans), for every M.
//
// Per layer (x [M, d] float32, row m the token of sequence seq[m] at position pos[m]; this
// rank's heads n_q / n_kv of head_dim hd). Every matmul runs once on all M rows (the
// weights are read once per step), everything else is per row:
//   xn  = rms_norm(x, attn_norm)
//   q,k,v = split(qkv(xn) (+ bias))          [M, n_q | n_kv | n_kv, hd]
//   q,k = rms_norm per head (qk_norm models), then RoPE in place, row m with cos/sin row m
//         of table rope_index
//   a[m] = attn_decode_update(q[m], k[m], v[m], caches[seq[m]], slot = pos[m] % slots,
//                             keys = min(pos[m] + 1, slots));   a = o_proj(a)
//   pre-norm (llama):  h = x + a;  out = h + down(act(gate) * up)      gate|up = gate_up(rms_norm(h, ffn_norm))
//   sandwich (gemma3): h = x + rms_norm(a, post_attn_norm);
//                      out = h + rms_norm(down(act(gate) * up), post_ffn_norm),  gate|up = gate_up(rms_norm(h, ffn_norm))
//   MoE FFN (layers/moe.py): ids, w = moe_route(router(y)); p = moe_experts(y, ids, w) on M tokens
//                      (+ down_partial(act(gate) * up) of the shared expert, x sigmoid(shared_gate(y)));
//                      ffn = float32(all_reduce(p))
// Row-parallel layers (o_proj, down) follow RowParallelLinear: float64 exact partials
// (single weight run), shm all-reduce over the host's ranks when `reduce` ([M, d] in one
// reduce), round to float32, then the bias.
#pragma once

#include <ATen/ATen.h>
#include <torch/custom_class.h>

#include <optional>
#include <vector>

namespace tp_numa {

// One linear layer of this rank: weight runs stacked along the output dim.
struct PlanLinear {
    struct Run {
        at::Tensor w;        // uint8: raw GGUF rows [rows, row_bytes] or x4-packed groups
        int64_t qtype = 0;   // GGML type id
        int64_t rows = 0;    // output rows of this run
        bool x4 = false;     // packed layout (quant_matmul_x4)
    };
    std::vector<Run> runs;
    std::optional<at::Tensor> bias;  // float32 [sum of rows]
    bool exact = true;               // row-parallel: float64 block-order partials
    bool reduce = false;             // row-parallel: all-reduce over the shm group
};

// A mixture-of-experts FFN (the nn.Module layers.moe.MoE): router, routing, this rank's
// expert slices (moe_experts), the shared expert in the layer's gate_up/down, one reduce.
struct PlanMoE {
    PlanLinear router;                       // [n_expert] logits (replicated)
    std::optional<PlanLinear> shared_gate;   // [1]: shared output x sigmoid(w . x) (qwen2moe)
    bool has_shared = false;                 // the layer's gate_up / down hold the shared expert
    int64_t k = 0, gating = 1, n_groups = 1, groups_used = 1;
    bool norm = false;
    double scale = 1.0;
    std::vector<at::Tensor> mats;            // moe_experts' [gate, up, down] buffers
    at::Tensor offsets, ff;
    std::vector<int64_t> qtypes, layouts;
    bool reduce = false;                     // all-reduce the float64 partial over the shm group
    std::optional<at::Tensor> counts;        // int64 [n_expert] += chosen experts (--verbose)
};

struct PlanLayer {
    bool sandwich = false;            // gemma3's four norms
    at::Tensor attn_norm, ffn_norm;   // [d]
    std::optional<at::Tensor> post_attn_norm, post_ffn_norm;   // [d], sandwich only
    std::optional<at::Tensor> q_norm, k_norm;                  // [hd], qk-norm models
    int64_t n_q = 0, n_kv = 0, head_dim = 0, rope_index = 0;
    bool neox = true;
    double scale = 1.0;
    at::Tensor k_cache, v_cache;      // [n_seqs, slots, n_kv, row]: row = hd (f16/bf16/f32) or hd/32*34 (q8_0)
    bool gelu = false;                // act = gelu-tanh, else silu
    PlanLinear qkv, o_proj, gate_up, down;
    std::optional<PlanMoE> moe;       // set: the FFN is a MoE block (gate_up/down = shared expert)
};

class DecodePlan : public torch::CustomClassHolder {
   public:
    // d_model, the RMSNorm eps shared by every norm, the shm group handle of the
    // all-reduce (-1: nothing is reduced, one rank).
    DecodePlan(int64_t d_model, double eps, int64_t shm_handle);

    // Appends a layer. norms = [attn_norm, ffn_norm] (pre-norm) or [attn_norm,
    // post_attn_norm, ffn_norm, post_ffn_norm] (sandwich); qk_norms = [] or [q_norm, k_norm];
    // heads = [n_q, n_kv, head_dim].
    // k_cache / v_cache: [n_seqs, slots, n_kv, row] (Attention.setup_cache), the same n_seqs
    // in every layer; sequence s's cache k_cache[s] is updated in place by forward.
    void add_layer(std::vector<at::Tensor> norms, std::vector<at::Tensor> qk_norms, std::vector<int64_t> heads,
                   int64_t rope_index, bool neox, double scale, at::Tensor k_cache, at::Tensor v_cache, bool gelu);

    // Makes the last added layer's FFN a MoE block: routing parameters (moe_route), the
    // expert buffers (moe_experts), whether gate_up/down hold a shared expert, whether the
    // partial is all-reduced, and an optional int64 [n_expert] count of chosen experts.
    // Then set_linear(4) gives the router, set_linear(5) the shared-expert gate.
    void set_moe(int64_t k, int64_t gating, bool norm, double scale, int64_t n_groups, int64_t groups_used,
                 std::vector<at::Tensor> mats, at::Tensor offsets, at::Tensor ff, std::vector<int64_t> qtypes,
                 std::vector<int64_t> layouts, bool has_shared, bool reduce, std::optional<at::Tensor> counts);

    // Sets a linear of the last added layer: which = 0 qkv, 1 o_proj, 2 gate_up, 3 down,
    // 4 MoE router, 5 MoE shared-expert gate. layouts[i] = 1 for an x4-packed run.
    // exact/reduce only matter for o_proj and down.
    void set_linear(int64_t which, std::vector<at::Tensor> weights, std::vector<int64_t> qtypes,
                    std::vector<int64_t> rows, std::vector<int64_t> layouts, std::optional<at::Tensor> bias,
                    bool exact, bool reduce);

    // x [M, d] float32 (not modified): row m is the next token of KV sequence seq[m] at
    // position pos[m] (M >= 1, distinct sequences) -> [M, d] after every layer.
    // cos/sin[j]: [M, rope_dim/2] float32 tables of rope j, row m for position pos[m].
    // The positions must fit the context (the Python side checks them against max_seq_len).
    at::Tensor forward(const at::Tensor& x, std::vector<int64_t> pos, std::vector<int64_t> seq,
                       std::vector<at::Tensor> cos, std::vector<at::Tensor> sin);

    int64_t n_layers() const { return static_cast<int64_t>(layers_.size()); }
    // KV sequences of every layer's caches (0 before the first add_layer)
    int64_t n_seqs() const { return n_seqs_; }

   private:
    // which sequence and position each of the M rows is (forward's pos / seq)
    struct Rows {
        const std::vector<int64_t>& pos;
        const std::vector<int64_t>& seq;
    };
    at::Tensor layer_forward(const PlanLayer& L, const at::Tensor& x, const Rows& rows, const at::Tensor& cos,
                             const at::Tensor& sin) const;
    at::Tensor attention(const PlanLayer& L, const at::Tensor& xn, const Rows& rows, const at::Tensor& cos,
                         const at::Tensor& sin) const;
    at::Tensor mlp(const PlanLayer& L, const at::Tensor& y) const;
    at::Tensor moe_ffn(const PlanLayer& L, const at::Tensor& y) const;
    at::Tensor partial(const PlanLinear& lin, const at::Tensor& x) const;   // float64, not reduced
    at::Tensor matmul(const PlanLinear& lin, const at::Tensor& x) const;   // runs, concatenated
    at::Tensor column(const PlanLinear& lin, const at::Tensor& x) const;
    at::Tensor row(const PlanLinear& lin, const at::Tensor& x) const;

    int64_t d_model_;
    double eps_;
    int64_t shm_handle_;
    int64_t n_seqs_ = 0;
    std::vector<PlanLayer> layers_;
};

}  // namespace tp_numa
