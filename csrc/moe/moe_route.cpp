// moe_route (moe_ops.h): router probabilities, group-limited top-k and the expert weights.
// The kernel works on raw pointers; the ATen wrapper checks shapes and loops over tokens.
#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <limits>
#include <vector>

#include "moe/moe_ops.h"

namespace tp_numa {
namespace moe {
namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// In place: v[0, n) -> exp(v - max) / sum, the sum in double (ggml's soft_max does the same).
void softmax(float* v, int n) {
    float mx = kNegInf;
    for (int i = 0; i < n; ++i) mx = std::max(mx, v[i]);
    double sum = 0.0;
    for (int i = 0; i < n; ++i) {
        v[i] = std::exp(v[i] - mx);
        sum += v[i];
    }
    const float inv = float(1.0 / sum);
    for (int i = 0; i < n; ++i) v[i] *= inv;
}

// Index of the largest of v[0, n) not yet taken (-1 if none is finite-or-inf selectable);
// ties go to the lower index.
int argmax_free(const float* v, int n, const std::vector<char>& taken) {
    int best = -1;
    for (int i = 0; i < n; ++i) {
        if (taken[i]) continue;
        if (best < 0 || v[i] > v[best]) best = i;
    }
    return best;
}

}  // namespace

void route_row(const float* logits, const float* bias, const RouteParams& p, float* scratch, int64_t* ids, float* w) {
    const int E = p.n_expert;
    float* prob = scratch;      // p: what the weights are taken from
    float* sel = scratch + E;   // s: what the top-k selects on
    for (int i = 0; i < E; ++i) prob[i] = logits[i];
    if (p.gating == kSoftmax) {
        softmax(prob, E);
    } else if (p.gating == kSigmoid) {
        for (int i = 0; i < E; ++i) prob[i] = 1.0f / (1.0f + std::exp(-prob[i]));
    }
    for (int i = 0; i < E; ++i) sel[i] = bias != nullptr ? prob[i] + bias[i] : prob[i];
    if (p.n_groups > 1 && p.groups_used < p.n_groups) {
        // score of a group = sum of its two best selection scores; drop all but the best groups_used
        const int gs = E / p.n_groups;
        std::vector<float> score(p.n_groups);
        for (int g = 0; g < p.n_groups; ++g) {
            float a = kNegInf, b = kNegInf;
            for (int i = g * gs; i < (g + 1) * gs; ++i) {
                if (sel[i] > a) {
                    b = a;
                    a = sel[i];
                } else if (sel[i] > b) {
                    b = sel[i];
                }
            }
            score[g] = gs >= 2 ? a + b : a;
        }
        std::vector<char> kept(p.n_groups, 0);
        for (int u = 0; u < p.groups_used; ++u) kept[argmax_free(score.data(), p.n_groups, kept)] = 1;
        for (int g = 0; g < p.n_groups; ++g)
            if (!kept[g])
                for (int i = g * gs; i < (g + 1) * gs; ++i) sel[i] = kNegInf;
    }
    std::vector<char> taken(E, 0);
    for (int j = 0; j < p.k; ++j) {
        const int e = argmax_free(sel, E, taken);
        taken[e] = 1;
        ids[j] = e;
        w[j] = prob[e];
    }
    if (p.gating == kSoftmaxTopK) softmax(w, p.k);
    if (p.norm) {
        float sum = 0.0f;
        for (int j = 0; j < p.k; ++j) sum += w[j];
        sum = std::max(sum, 6.103515625e-5f);  // llama.cpp clamps the sum at 2^-14
        for (int j = 0; j < p.k; ++j) w[j] /= sum;
    }
    if (p.scale != 0.0f && p.scale != 1.0f)
        for (int j = 0; j < p.k; ++j) w[j] *= p.scale;
}

}  // namespace moe

std::tuple<at::Tensor, at::Tensor> moe_route(const at::Tensor& logits, const std::optional<at::Tensor>& bias,
                                             int64_t k, int64_t gating, bool norm, double scale, int64_t n_groups,
                                             int64_t groups_used) {
    TORCH_CHECK(logits.device().is_cpu() && logits.scalar_type() == at::kFloat && logits.dim() == 2 &&
                    logits.is_contiguous(),
                "moe_route: logits must be a contiguous float32 CPU tensor [T, n_expert], got ", logits.scalar_type(),
                " ", logits.sizes());
    const int64_t T = logits.size(0), E = logits.size(1);
    TORCH_CHECK(k >= 1 && k <= E, "moe_route: k=", k, " experts per token must be in [1, n_expert=", E, "]");
    TORCH_CHECK(gating >= 1 && gating <= 3, "moe_route: gating must be 1 (softmax), 2 (sigmoid) or 3 (softmax "
                "over the top-k logits), got ", gating);
    const int64_t groups = std::max<int64_t>(1, n_groups);
    TORCH_CHECK(E % groups == 0, "moe_route: ", E, " experts do not split into ", groups, " groups");
    TORCH_CHECK(groups == 1 || (groups_used >= 1 && groups_used <= groups && groups_used * (E / groups) >= k),
                "moe_route: groups_used=", groups_used, " of ", groups, " groups of ", E / groups,
                " experts cannot hold k=", k, " experts");
    const float* bp = nullptr;
    if (bias.has_value()) {
        TORCH_CHECK(bias->device().is_cpu() && bias->scalar_type() == at::kFloat && bias->dim() == 1 &&
                        bias->size(0) == E && bias->is_contiguous(),
                    "moe_route: bias must be a contiguous float32 CPU tensor [", E, "]");
        bp = bias->data_ptr<float>();
    }
    moe::RouteParams p;
    p.n_expert = int(E);
    p.k = int(k);
    p.gating = int(gating);
    p.norm = norm;
    p.scale = float(scale);
    p.n_groups = int(groups);
    p.groups_used = int(groups == 1 ? 1 : groups_used);
    at::Tensor ids = at::empty({T, k}, logits.options().dtype(at::kLong));
    at::Tensor w = at::empty({T, k}, logits.options());
    const float* lp = logits.data_ptr<float>();
    int64_t* ip = ids.data_ptr<int64_t>();
    float* wp = w.data_ptr<float>();
    at::parallel_for(0, T, std::max<int64_t>(1, 4096 / E), [&](int64_t t0, int64_t t1) {
        std::vector<float> scratch(2 * size_t(E));
        for (int64_t t = t0; t < t1; ++t) moe::route_row(lp + t * E, bp, p, scratch.data(), ip + t * k, wp + t * k);
    });
    return {ids, w};
}

}  // namespace tp_numa
