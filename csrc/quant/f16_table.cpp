// The half -> float lookup table of the SIMD kernels (filled once when the library loads).
// A table load + vbroadcastss costs no vector ALU slot, unlike vcvtph2ps + broadcast; the
// kernels convert one or two scales per block, so this frees ~4 of ~12 vector uops per
// 32-element block on the hot GEMV paths.
#include "quant/blocks.h"

namespace tp_numa::quant {

alignas(64) float g_f16_table[65536];

namespace {
struct FillF16Table {
    FillF16Table() {
        for (uint32_t h = 0; h < 65536; ++h) g_f16_table[h] = f16_to_f32(f16_t(h));
    }
} fill_f16_table;
}  // namespace

}  // namespace tp_numa::quant
