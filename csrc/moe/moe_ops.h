// Mixture-of-experts ops (csrc/moe): routing and the routed experts of one layer on this
// rank's slice of every expert (expert tensor parallel).
//
// Routing (moe_route, one token row of router logits l[E]):
//   p   = softmax(l) | sigmoid(l) | l (gating 3: top-k of the raw logits, softmax over those k)
//   s   = p + bias                        selection only (DeepSeek V3's exp_probs_b), optional
//   groups: keep the groups_used groups of E / n_groups experts with the largest sum of
//           their top-2 s, the others' s = -inf (n_groups <= 1: no groups)
//   ids = top-k of s (ties: the lower expert id first), w_j = p[ids_j]
//   norm: w /= max(sum w, 2^-14);  scale != 0, 1: w *= scale
// as llama.cpp's build_moe_ffn does it.
//
// Experts (moe_experts): y[t] = sum_j w[t, j] * down_e(act(gate_e(x[t])) * up_e(x[t])),
// e = ids[t, j], over this rank's slice of each expert: rows [f0, f1) of its gate and up
// = input columns [f0, f1) of its down (whole quant blocks). y is the float64 partial
// sum of the rank (down's Exact accumulation, weighted in float64): the caller adds the
// shared expert's partial, all-reduces over the ranks and rounds to float32 once, so tp=N
// gives the float32 that tp=1 gives.
#pragma once
#include <ATen/ATen.h>

#include <tuple>
#include <vector>

namespace tp_numa {

// logits float32 [T, E], bias float32 [E] or none -> (ids int64 [T, k], weights float32 [T, k]).
// gating: 1 softmax, 2 sigmoid, 3 softmax over the top-k raw logits.
std::tuple<at::Tensor, at::Tensor> moe_route(const at::Tensor& logits, const std::optional<at::Tensor>& bias,
                                             int64_t k, int64_t gating, bool norm, double scale, int64_t n_groups,
                                             int64_t groups_used);

// x float32 [T, d]; ids int64 / weights float32 [T, k] from moe_route;
// mats = [gate, up, down]: flat uint8 buffers holding every expert's slice, expert e's at
// byte offset offsets[m, e] (int64 [3, E]): gate/up ff[e] rows of d inputs, down d rows of
// ff[e] inputs, as raw GGUF rows (layouts[m] = 0) or x4-packed groups (1); ff int64 [E]
// (0: this rank holds nothing of expert e); qtypes[m] = GGML type ids; gelu: gelu-tanh,
// else silu. Returns float64 [T, d].
at::Tensor moe_experts(const at::Tensor& x, const at::Tensor& ids, const at::Tensor& weights,
                       const std::vector<at::Tensor>& mats, const at::Tensor& offsets, const at::Tensor& ff,
                       const std::vector<int64_t>& qtypes, const std::vector<int64_t>& layouts, bool gelu);

namespace moe {

enum Gating : int { kSoftmax = 1, kSigmoid = 2, kSoftmaxTopK = 3 };

struct RouteParams {
    int n_expert = 0, k = 0, gating = kSoftmax, n_groups = 1, groups_used = 1;
    bool norm = false;
    float scale = 1.0f;
};

// One token: logits[E] (+ bias[E] or nullptr) -> ids[k], w[k]. scratch: 2 * E floats.
void route_row(const float* logits, const float* bias, const RouteParams& p, float* scratch, int64_t* ids, float* w);

}  // namespace moe
}  // namespace tp_numa
