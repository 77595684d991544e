// ATen entry points of the fused row ops (csrc/fused/fused_ops.cpp). All float32.
#pragma once
#include <ATen/ATen.h>

#include <optional>

namespace tp_numa {

// x [..., d] contiguous, w [d] -> rms_norm(x) * w, same shape.
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& w, double eps);
// residual += x (in place), returns rms_norm(residual) * w. residual/x [..., d] contiguous.
// With x_weight (Gemma's sandwich norms) the added term is rms_norm(x) * x_weight instead.
at::Tensor add_rms_norm_(at::Tensor& residual, const at::Tensor& x, const at::Tensor& w, double eps,
                         const std::optional<at::Tensor>& x_weight);
// In-place RoPE of x [T, H, D] (heads and dims contiguous, any row stride) with cos/sin
// [T, rd/2] contiguous; neox = half-split pairs, else adjacent pairs.
void rope_(at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin, bool neox);
// gu [T, 2f] = [gate | up] contiguous -> act(gate) * up [T, f]; act = gelu-tanh if gelu else silu.
at::Tensor act_mul(const at::Tensor& gu, bool gelu);

}  // namespace tp_numa
