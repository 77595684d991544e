// Small fused row ops of a decoder layer on raw float32 pointers (no torch). Each replaces a
// chain of 5-12 eager torch ops whose per-op dispatch cost, not arithmetic, dominates a
// decode step of a small model. Row-wise: the ATen wrapper (fused_ops.cpp) spreads rows
// over threads when there are many (prefill) and runs inline for one row (decode).
#pragma once
#include <cstdint>

namespace tp_numa::fused {

struct Kernels {
    const char* isa;
    // y = x / sqrt(mean(x^2) + eps) * w over d elements (one row).
    void (*rms_norm_row)(const float* x, const float* w, float eps, int64_t d, float* y);
    // r += a (the residual stream), then y = rms_norm(r) (one row). Reads all of a before
    // writing y, so a may alias y.
    void (*add_rms_norm_row)(float* r, const float* a, const float* w, float eps, int64_t d, float* y);
    // RoPE in place on one head of D values: pairs (i, i + rd/2) if neox, else (2i, 2i+1),
    // for i < rd/2: (a, b) -> (a cos_i - b sin_i, a sin_i + b cos_i); dims >= rd unchanged.
    void (*rope_head)(float* x, const float* cos, const float* sin, int64_t rd, bool neox);
    // y[i] = act(g[i]) * u[i] for i < f; act = silu (x sigmoid(x)) or gelu-tanh
    // (0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))).
    void (*act_mul_row)(const float* g, const float* u, int64_t f, bool gelu, float* y);
};

const Kernels& scalar_kernels();
const Kernels* avx2_kernels();  // nullptr if the CPU lacks AVX2/FMA
// The variant the fused ops use: AVX2 unless the quant kernels are forced to scalar.
const Kernels& active_kernels();

}  // namespace tp_numa::fused
