// Scalar reference of the fused row ops (the definition the AVX2 file reproduces).
#include <cmath>

#include "fused/fused_kernels.h"

namespace tp_numa::fused {
namespace {

void rms_norm_row_scalar(const float* x, const float* w, float eps, int64_t d, float* y) {
    float ss = 0.f;
    for (int64_t i = 0; i < d; ++i) ss += x[i] * x[i];
    const float inv = 1.f / std::sqrt(ss / float(d) + eps);
    for (int64_t i = 0; i < d; ++i) y[i] = x[i] * inv * w[i];
}

void add_rms_norm_row_scalar(float* r, const float* a, const float* w, float eps, int64_t d, float* y) {
    for (int64_t i = 0; i < d; ++i) r[i] += a[i];
    rms_norm_row_scalar(r, w, eps, d, y);
}

void rope_head_scalar(float* x, const float* cos, const float* sin, int64_t rd, bool neox) {
    const int64_t half = rd / 2;
    for (int64_t i = 0; i < half; ++i) {
        float* pa = neox ? x + i : x + 2 * i;
        float* pb = neox ? x + i + half : x + 2 * i + 1;
        const float a = *pa, b = *pb;
        *pa = a * cos[i] - b * sin[i];
        *pb = a * sin[i] + b * cos[i];
    }
}

void act_mul_row_scalar(const float* g, const float* u, int64_t f, bool gelu, float* y) {
    for (int64_t i = 0; i < f; ++i) {
        const float x = g[i];
        float act;
        if (gelu) {
            act = 0.5f * x * (1.f + std::tanh(0.7978845608028654f * (x + 0.044715f * x * x * x)));
        } else {
            act = x / (1.f + std::exp(-x));
        }
        y[i] = act * u[i];
    }
}

}  // namespace

const Kernels& scalar_kernels() {
    static const Kernels k{"scalar", rms_norm_row_scalar, add_rms_norm_row_scalar, rope_head_scalar,
                           act_mul_row_scalar};
    return k;
}

}  // namespace tp_numa::fused
