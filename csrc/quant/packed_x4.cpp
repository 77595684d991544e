// Packing to and from the x4 layout (packed_x4.h), and the lane-order activation. Plain
// scalar code: it runs once per weight at load time and once per activation row per call.
#include "quant/packed_x4.h"

#include <cstring>

namespace tp_numa::quant {
namespace {

// The 32 codes of one GGUF block (unsigned 0..15 / 0..31 for Q4_0 / Q5_0, int8 for Q8_0).
void block_codes(int64_t qtype, const uint8_t* blk, uint8_t code[QK]) {
    if (qtype == kQ8_0) {
        std::memcpy(code, blk + 2, QK);
        return;
    }
    const uint8_t* qs = blk + (qtype == kQ5_0 ? 6 : 2);
    uint32_t qh = 0;
    if (qtype == kQ5_0) std::memcpy(&qh, blk + 2, 4);
    for (int e = 0; e < QK; ++e) {
        const int nib = e < QK / 2 ? (qs[e] & 15) : (qs[e - QK / 2] >> 4);
        code[e] = uint8_t(nib | (((qh >> e) & 1) << 4));
    }
}

void set_block_codes(int64_t qtype, const uint8_t code[QK], uint8_t* blk) {
    if (qtype == kQ8_0) {
        std::memcpy(blk + 2, code, QK);
        return;
    }
    uint8_t* qs = blk + (qtype == kQ5_0 ? 6 : 2);
    uint32_t qh = 0;
    for (int e = 0; e < QK / 2; ++e) qs[e] = uint8_t((code[e] & 15) | (code[e + QK / 2] & 15) << 4);
    for (int e = 0; e < QK; ++e) qh |= uint32_t((code[e] >> 4) & 1) << e;
    if (qtype == kQ5_0) std::memcpy(blk + 2, &qh, 4);
}

int row_block_bytes(int64_t qtype) { return x4_group_bytes(qtype) / 4; }

// Lane-order codes of a group block <-> its bytes after the 8 scale bytes.
void store_group_codes(int64_t qtype, const uint8_t code[4][QK], uint8_t* p) {
    if (qtype == kQ8_0) {
        std::memcpy(p, code, 4 * QK);
        return;
    }
    uint8_t* qs = p;
    if (qtype == kQ5_0) {
        uint8_t* qh = p;
        std::memset(qh, 0, 16);
        for (int v = 0; v < 4; ++v)
            for (int j = 0; j < QK; ++j)
                if (code[v][j] & 16) qh[j % 16] |= uint8_t(1 << (2 * v + (j >= 16)));
        qs = p + 16;
    }
    for (int m = 0; m < 2; ++m)
        for (int j = 0; j < QK; ++j) qs[32 * m + j] = uint8_t((code[2 * m][j] & 15) | (code[2 * m + 1][j] & 15) << 4);
}

void load_group_codes(int64_t qtype, const uint8_t* p, uint8_t code[4][QK]) {
    if (qtype == kQ8_0) {
        std::memcpy(code, p, 4 * QK);
        return;
    }
    const uint8_t* qs = qtype == kQ5_0 ? p + 16 : p;
    for (int m = 0; m < 2; ++m)
        for (int j = 0; j < QK; ++j) {
            code[2 * m][j] = qs[32 * m + j] & 15;
            code[2 * m + 1][j] = qs[32 * m + j] >> 4;
        }
    if (qtype == kQ5_0)
        for (int v = 0; v < 4; ++v)
            for (int j = 0; j < QK; ++j) code[v][j] |= uint8_t(((p[j % 16] >> (2 * v + (j >= 16))) & 1) << 4);
}

}  // namespace

void pack_x4(int64_t qtype, const uint8_t* rows, size_t row_bytes, int64_t n_rows, int nb, uint8_t* out) {
    const int bb = row_block_bytes(qtype), gb = x4_group_bytes(qtype);
    const int64_t ngroups = (n_rows + 3) / 4;
    for (int64_t g = 0; g < ngroups; ++g) {
        for (int i = 0; i < nb; ++i) {
            uint8_t* p = out + (size_t(g) * nb + i) * gb;
            uint8_t row_code[4][QK] = {};
            uint16_t d[4] = {0, 0, 0, 0};
            for (int r = 0; r < 4; ++r) {
                const int64_t n = 4 * g + r;
                if (n >= n_rows) continue;  // padding row: d = 0, codes 0
                const uint8_t* blk = rows + size_t(n) * row_bytes + size_t(i) * bb;
                std::memcpy(&d[r], blk, 2);
                block_codes(qtype, blk, row_code[r]);
            }
            uint8_t code[4][QK];
            for (int v = 0; v < 4; ++v)
                for (int j = 0; j < QK; ++j) code[v][j] = row_code[x4_row(j)][x4_element(v, j)];
            std::memcpy(p, d, 8);
            store_group_codes(qtype, code, p + 8);
        }
    }
}

void unpack_x4(int64_t qtype, const uint8_t* packed, int64_t n_rows, int nb, uint8_t* rows) {
    const int bb = row_block_bytes(qtype), gb = x4_group_bytes(qtype);
    const size_t row_bytes = size_t(nb) * bb;
    const int64_t ngroups = (n_rows + 3) / 4;
    for (int64_t g = 0; g < ngroups; ++g) {
        for (int i = 0; i < nb; ++i) {
            const uint8_t* p = packed + (size_t(g) * nb + i) * gb;
            uint8_t code[4][QK];
            load_group_codes(qtype, p + 8, code);
            uint8_t row_code[4][QK];
            for (int v = 0; v < 4; ++v)
                for (int j = 0; j < QK; ++j) row_code[x4_row(j)][x4_element(v, j)] = code[v][j];
            for (int r = 0; r < 4; ++r) {
                const int64_t n = 4 * g + r;
                if (n >= n_rows) continue;
                uint8_t* blk = rows + size_t(n) * row_bytes + size_t(i) * bb;
                std::memcpy(blk, p + 2 * r, 2);
                set_block_codes(qtype, row_code[r], blk);
            }
        }
    }
}

void expand_act_x4(const void* q8a, int nb, void* out) {
    const auto* a = static_cast<const BlockQ8A*>(q8a);
    auto* o = static_cast<BlockQ8AX4*>(out);
    for (int i = 0; i < nb; ++i) {
        o[i].d = a[i].d;
        o[i].s = a[i].s;
        for (int v = 0; v < 4; ++v)
            for (int j = 0; j < QK; ++j) o[i].qs[v][j] = a[i].qs[x4_element(v, j)];
    }
}

}  // namespace tp_numa::quant
