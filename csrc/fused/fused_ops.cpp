// ATen wrappers of the fused row ops: shape/dtype checks, then rows over threads (one row,
// as in decode, runs inline: waking the pool would cost more than the row).
#include "fused/fused_ops.h"

#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <optional>

#include "fused/fused_kernels.h"
#include "quant/quant_ops.h"

namespace tp_numa {

const fused::Kernels& fused::active_kernels() {
    // follows the quant kernels' ISA choice (TP_NUMA_KERNEL=scalar selects the references)
    if (kernel_isa() != "scalar") {
        if (const fused::Kernels* k = fused::avx2_kernels()) return *k;
    }
    return fused::scalar_kernels();
}

namespace {

const fused::Kernels& kernels() { return fused::active_kernels(); }

void check_f32(const at::Tensor& t, const char* op, const char* name, bool contiguous = true) {
    TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat, op, ": ", name, " must be a float32 CPU tensor, got ",
                t.scalar_type());
    TORCH_CHECK(!contiguous || t.is_contiguous(), op, ": ", name, " must be contiguous");
}

template <class F>
void for_rows(int64_t rows, int64_t row_len, F&& f) {
    const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, row_len));
    at::parallel_for(0, rows, grain, [&](int64_t b, int64_t e) {
        for (int64_t r = b; r < e; ++r) f(r);
    });
}

}  // namespace

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& w, double eps) {
    check_f32(x, "rms_norm", "x");
    check_f32(w, "rms_norm", "w");
    const int64_t d = x.size(-1);
    TORCH_CHECK(w.dim() == 1 && w.size(0) == d, "rms_norm: w must be [", d, "], got ", w.sizes());
    at::Tensor y = at::empty_like(x);
    const auto& k = kernels();
    const float *xp = x.data_ptr<float>(), *wp = w.data_ptr<float>();
    float* yp = y.data_ptr<float>();
    for_rows(x.numel() / d, d, [&](int64_t r) { k.rms_norm_row(xp + r * d, wp, float(eps), d, yp + r * d); });
    return y;
}

at::Tensor add_rms_norm_(at::Tensor& residual, const at::Tensor& x, const at::Tensor& w, double eps,
                         const std::optional<at::Tensor>& x_weight) {
    check_f32(residual, "add_rms_norm_", "residual");
    check_f32(x, "add_rms_norm_", "x");
    check_f32(w, "add_rms_norm_", "w");
    TORCH_CHECK(residual.sizes() == x.sizes(), "add_rms_norm_: residual ", residual.sizes(), " and x ", x.sizes(),
                " differ");
    const int64_t d = x.size(-1);
    TORCH_CHECK(w.dim() == 1 && w.size(0) == d, "add_rms_norm_: w must be [", d, "], got ", w.sizes());
    const float* xwp = nullptr;
    if (x_weight.has_value()) {
        check_f32(*x_weight, "add_rms_norm_", "x_weight");
        TORCH_CHECK(x_weight->dim() == 1 && x_weight->size(0) == d, "add_rms_norm_: x_weight must be [", d, "]");
        xwp = x_weight->data_ptr<float>();
    }
    at::Tensor y = at::empty_like(x);
    const auto& k = kernels();
    float* rp = residual.data_ptr<float>();
    const float *xp = x.data_ptr<float>(), *wp = w.data_ptr<float>();
    float* yp = y.data_ptr<float>();
    for_rows(x.numel() / d, d, [&](int64_t r) {
        const float* add = xp + r * d;
        if (xwp != nullptr) {  // sandwich norm: the added term is rms_norm(x) * x_weight (built in y)
            k.rms_norm_row(add, xwp, float(eps), d, yp + r * d);
            add = yp + r * d;
        }
        // reads all of `add` before it writes y, so add may alias y
        k.add_rms_norm_row(rp + r * d, add, wp, float(eps), d, yp + r * d);
    });
    return y;
}

void rope_(at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin, bool neox) {
    check_f32(x, "rope_", "x", false);
    check_f32(cos, "rope_", "cos");
    check_f32(sin, "rope_", "sin");
    TORCH_CHECK(x.dim() == 3, "rope_: x must be [T, H, D], got ", x.sizes());
    const int64_t T = x.size(0), H = x.size(1), D = x.size(2);
    TORCH_CHECK(x.stride(2) == 1 && (H == 1 || x.stride(1) == D), "rope_: x needs contiguous heads and dims");
    TORCH_CHECK(cos.dim() == 2 && cos.size(0) == T && cos.sizes() == sin.sizes() && 2 * cos.size(1) <= D,
                "rope_: cos/sin must be [T, rd/2] with rd <= D, got ", cos.sizes(), " for x ", x.sizes());
    const int64_t half = cos.size(1), rs = x.stride(0);
    const auto& k = kernels();
    float* xp = x.data_ptr<float>();
    const float *cp = cos.data_ptr<float>(), *sp = sin.data_ptr<float>();
    for_rows(T, H * D, [&](int64_t t) {
        for (int64_t h = 0; h < H; ++h) k.rope_head(xp + t * rs + h * D, cp + t * half, sp + t * half, 2 * half, neox);
    });
}

at::Tensor act_mul(const at::Tensor& gu, bool gelu) {
    check_f32(gu, "act_mul", "gu");
    TORCH_CHECK(gu.dim() == 2 && gu.size(1) % 2 == 0, "act_mul: gu must be [T, 2f], got ", gu.sizes());
    const int64_t T = gu.size(0), f = gu.size(1) / 2;
    at::Tensor y = at::empty({T, f}, gu.options());
    const auto& k = kernels();
    const float* gp = gu.data_ptr<float>();
    float* yp = y.data_ptr<float>();
    for_rows(T, f, [&](int64_t t) { k.act_mul_row(gp + t * 2 * f, gp + t * 2 * f + f, f, gelu, yp + t * f); });
    return y;
}

}  // namespace tp_numa
