// Kernel interface shared by the scalar reference and the SIMD variants (torch-free).
//
// A matmul y[M, N] = x[M, K] @ W^T runs in two steps:
//   1. prepare: each activation row x[m] is turned into the form the weight type's dot
//      product consumes (float for F32/F16/BF16, BlockQ8A for 32-blocks, BlockQ8K for
//      256-blocks), once per call;
//   2. rows: y[m, r] = dot(W[r], act[m]) for a range of weight rows r; the variants may
//      process several weight rows at once to share activation loads.
#pragma once
#include <cstddef>
#include <cstdint>
#include <type_traits>

#include "quant/blocks.h"
#include "quant/packed_x4.h"

namespace tp_numa::quant {

// kQ8AX4 / kQ8KX4 / kQ8KX4L: kQ8A's / kQ8K's values for the x4 kernels (BlockQ8AX4,
// BlockQ8KX4 for the GEMV, BlockQ8KX4L for prefill; packed_x4.h).
enum class ActKind { kFloat, kQ8A, kQ8K, kQ8AX4, kQ8KX4, kQ8KX4L };

struct TypeInfo {
    const char* name;
    int block_elems;  // elements per block
    int block_bytes;  // bytes per block in the GGUF row
    ActKind act;      // activation form its dot product consumes
};

// nullptr for an unknown / unsupported type id.
inline const TypeInfo* type_info(int64_t qtype) {
    static const TypeInfo kF32i{"F32", 1, 4, ActKind::kFloat};
    static const TypeInfo kF16i{"F16", 1, 2, ActKind::kFloat};
    static const TypeInfo kBF16i{"BF16", 1, 2, ActKind::kFloat};
    static const TypeInfo kQ4_0i{"Q4_0", QK, 18, ActKind::kQ8A};
    static const TypeInfo kQ4_1i{"Q4_1", QK, 20, ActKind::kQ8A};
    static const TypeInfo kQ5_0i{"Q5_0", QK, 22, ActKind::kQ8A};
    static const TypeInfo kQ5_1i{"Q5_1", QK, 24, ActKind::kQ8A};
    static const TypeInfo kQ8_0i{"Q8_0", QK, 34, ActKind::kQ8A};
    static const TypeInfo kIQ4_NLi{"IQ4_NL", QK, 18, ActKind::kQ8A};
    static const TypeInfo kQ4_Ki{"Q4_K", QK_K, 144, ActKind::kQ8K};
    static const TypeInfo kQ5_Ki{"Q5_K", QK_K, 176, ActKind::kQ8K};
    static const TypeInfo kQ6_Ki{"Q6_K", QK_K, 210, ActKind::kQ8K};
    static const TypeInfo kIQ4_XSi{"IQ4_XS", QK_K, 136, ActKind::kQ8K};
    switch (qtype) {
        case kF32: return &kF32i;
        case kF16: return &kF16i;
        case kBF16: return &kBF16i;
        case kQ4_0: return &kQ4_0i;
        case kQ4_1: return &kQ4_1i;
        case kQ5_0: return &kQ5_0i;
        case kQ5_1: return &kQ5_1i;
        case kQ8_0: return &kQ8_0i;
        case kIQ4_NL: return &kIQ4_NLi;
        case kQ4_K: return &kQ4_Ki;
        case kQ5_K: return &kQ5_Ki;
        case kQ6_K: return &kQ6_Ki;
        case kIQ4_XS: return &kIQ4_XSi;
        default: return nullptr;
    }
}

// Bytes of one prepared activation row of K elements.
inline size_t act_row_bytes(ActKind kind, int64_t K) {
    switch (kind) {
        case ActKind::kFloat: return size_t(K) * sizeof(float);
        case ActKind::kQ8A: return size_t(K / QK) * sizeof(BlockQ8A);
        case ActKind::kQ8K: return size_t(K / QK_K) * sizeof(BlockQ8K);
        case ActKind::kQ8AX4: return size_t(K / QK) * sizeof(BlockQ8AX4);
        case ActKind::kQ8KX4: return size_t(K / QK_K) * sizeof(BlockQ8KX4);
        case ActKind::kQ8KX4L: return size_t(K / QK_K) * sizeof(BlockQ8KX4L);
    }
    return 0;
}

// The activation form of the x4 kernels for a type whose row kernels take `row_kind`, for
// M activation rows (the GEMV and the prefill micro-kernels of the K-quants differ).
inline ActKind x4_act_kind(ActKind row_kind, int64_t M) {
    if (row_kind != ActKind::kQ8K) return ActKind::kQ8AX4;
    return M >= 2 ? ActKind::kQ8KX4L : ActKind::kQ8KX4;
}

// y[r] = dot(w + r * w_stride, act) for r in [0, nrows); nb = blocks per row (for float
// types nb = K). act is the prepared row (float* / BlockQ8A* / BlockQ8K*).
using RowsFn = void (*)(int nb, const uint8_t* w, size_t w_stride, int nrows, const void* act,
                        float* y);
// The same with float64 results from the Exact accumulation: every block's fp32 term is
// added in float64, so y does not depend on how a row is split into block ranges.
using RowsExactFn = void (*)(int nb, const uint8_t* w, size_t w_stride, int nrows, const void* act,
                             double* y);
using QuantizeFn = void (*)(const float* x, int64_t K, void* out);

// Prefill micro-tiles: y[m * y_stride + r] = dot(w + r * w_stride, act + m * act_stride)
// for r < nrows, m < mrows. Unpacks each weight block once for several activation rows.
using TileFn = void (*)(int nb, const uint8_t* w, size_t w_stride, int nrows, const uint8_t* act,
                        size_t act_stride, int mrows, float* y, size_t y_stride);
using TileExactFn = void (*)(int nb, const uint8_t* w, size_t w_stride, int nrows, const uint8_t* act,
                             size_t act_stride, int mrows, double* y, size_t y_stride);

// One instruction-set variant: a rows kernel per type id (nullptr = use the scalar one)
// and the activation quantizers.
struct Kernels {
    const char* isa;
    RowsFn rows[32];
    TileFn tile[32];  // nullptr: prefill loops the rows kernel over activation rows
    RowsExactFn rows_exact[32];  // nullptr: use the scalar reference's
    TileExactFn tile_exact[32];
    // x4 layout (packed_x4.h): nullptr = the driver unpacks groups for the rows kernels
    RowsX4Fn rows_x4[32];
    RowsX4ExactFn rows_x4_exact[32];
    TileX4Fn tile_x4[32];
    TileX4ExactFn tile_x4_exact[32];
    QuantizeFn quantize_q8a;
    QuantizeFn quantize_q8ax4;  // quantize_q8a's blocks, written in lane order
    QuantizeFn quantize_q8k;
    QuantizeFn quantize_q8kx4;   // quantize_q8k's blocks, written as BlockQ8KX4
    QuantizeFn quantize_q8kx4l;  // ... as BlockQ8KX4L
};

// The activation row x[0, K) prepared into the form `kind` (act_row_bytes(kind, K) bytes at out);
// kFloat copies the floats.
inline void prepare_row(const Kernels& k, ActKind kind, const float* x, int64_t K, void* out) {
    switch (kind) {
        case ActKind::kFloat: {
            float* o = static_cast<float*>(out);
            for (int64_t i = 0; i < K; ++i) o[i] = x[i];
            return;
        }
        case ActKind::kQ8A: return k.quantize_q8a(x, K, out);
        case ActKind::kQ8K: return k.quantize_q8k(x, K, out);
        case ActKind::kQ8AX4: return k.quantize_q8ax4(x, K, out);
        case ActKind::kQ8KX4: return k.quantize_q8kx4(x, K, out);
        case ActKind::kQ8KX4L: return k.quantize_q8kx4l(x, K, out);
    }
}

// The Fast (Out = float) or the Exact (Out = double) member of a kernel pair.
template <class Out, class F, class E>
auto pick(F fast, E exact) {
    if constexpr (std::is_same_v<Out, double>) {
        return exact;
    } else {
        return fast;
    }
}

const Kernels& scalar_kernels();
const Kernels* avx2_kernels();     // nullptr if not compiled in
const Kernels* avx512_kernels();      // AVX-512 F/BW/VL
const Kernels* avx512vnni_kernels();  // AVX-512 F/BW/VL + VNNI (vpdpbusd)

// The variant in use: TP_NUMA_KERNEL / set_kernel_isa override, else CPU detection.
const Kernels& active_kernels();

}  // namespace tp_numa::quant
