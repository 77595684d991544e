// Packing to and from the x4 layout (packed_x4.h), and the lane-order activation. Plain
// scalar code: it runs once per weight at load time and once per activation row per call.
#include "quant/packed_x4.h"

#include <cstring>
#include <type_traits>

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

// ---- Q5_0 (packed_x4.h): qh[16], a[32], b[32] ----
//
// x4q5_carry and x4q5_high_* are what X4Q5_0::codes computes, byte by byte: the 16-bit
// shift of a / b right by 5, and qh shifted per 128-bit half (64-bit shifts), each masked
// to the 5 bits the kernel keeps. Code 2 = carry(a) ^ high_2, code 3 = carry(b) ^ high_3.

// Byte j of the vector x shifted right by s (0 < s < 8) in 16-bit lanes (vpsrlw): x[j]'s
// top bits, and for even j (a lane's low byte) the low bits of x[j + 1] above them.
uint8_t srl16_byte(const uint8_t* x, int j, int s) {
    const int up = j % 2 == 0 ? x[j + 1] << (8 - s) : 0;
    return uint8_t((x[j] >> s) | up);
}

// Bits 0..4 of byte j of x >> 5 (16-bit lanes).
uint8_t x4q5_carry(const uint8_t* x, int j) { return srl16_byte(x, j, 5) & 31; }

// Bits 0..4 of byte j of qh (broadcast to both halves) shifted right by 1 (low half, j < 16)
// or 3 (high half): bits 1..5 / 3..7 of qh[j % 16].
uint8_t x4q5_high_2(const uint8_t* qh, int j) { return uint8_t((qh[j % 16] >> (j < 16 ? 1 : 3)) & 31); }

// ... shifted left by 3 (low half) or 1 (high half): qh[k]'s low bits, and the previous
// byte's top bits within the 64-bit lane.
uint8_t x4q5_high_3(const uint8_t* qh, int j) {
    const int k = j % 16, s = j < 16 ? 3 : 1;
    const int prev = k % 8 != 0 ? qh[k - 1] >> (8 - s) : 0;
    return uint8_t(((qh[k] << s) | prev) & 31);
}

// Codes 0 and 1 go to bits 0..4 of a and b. Bits 3..4 of codes 2 and 3 are then fixed by qh
// alone (the carried-in bits of a and b are code 0 / 1 bits): bits 4..5 (code 2) and 0..1
// (code 3) of qh[k] for byte k, bits 6..7 and 2..3 for byte k + 16. Last, the top 3 bits
// of a and b make bits 0..2 right.
void store_group_q5_0(const uint8_t code[4][QK], uint8_t* p) {
    uint8_t *qh = p, *a = p + 16, *b = p + 48;
    for (int j = 0; j < QK; ++j) {
        a[j] = code[0][j];
        b[j] = code[1][j];
    }
    std::memset(qh, 0, 16);
    for (int j = 0; j < QK; ++j) {
        const int hi2 = ((code[2][j] ^ x4q5_carry(a, j)) >> 3) & 3, hi3 = ((code[3][j] ^ x4q5_carry(b, j)) >> 3) & 3;
        qh[j % 16] = uint8_t(qh[j % 16] | (j < 16 ? hi2 << 4 | hi3 : hi2 << 6 | hi3 << 2));
    }
    for (int j = 0; j < QK; ++j) {
        a[j] = uint8_t(a[j] | ((code[2][j] ^ x4q5_high_2(qh, j)) & 7) << 5);
        b[j] = uint8_t(b[j] | ((code[3][j] ^ x4q5_high_3(qh, j)) & 7) << 5);
    }
}

void load_group_q5_0(const uint8_t* p, uint8_t code[4][QK]) {
    const uint8_t *qh = p, *a = p + 16, *b = p + 48;
    for (int j = 0; j < QK; ++j) {
        code[0][j] = a[j] & 31;
        code[1][j] = b[j] & 31;
        code[2][j] = x4q5_carry(a, j) ^ x4q5_high_2(qh, j);
        code[3][j] = x4q5_carry(b, j) ^ x4q5_high_3(qh, j);
    }
}

// Lane-order codes of a group block <-> its bytes after the 8 scale bytes.
void store_group_codes(int64_t qtype, const uint8_t code[4][QK], uint8_t* p) {
    if (qtype == kQ8_0) {
        std::memcpy(p, code, 4 * QK);
        return;
    }
    if (qtype == kQ5_0) {
        store_group_q5_0(code, p);
        return;
    }
    for (int m = 0; m < 2; ++m)
        for (int j = 0; j < QK; ++j) p[32 * m + j] = uint8_t((code[2 * m][j] & 15) | (code[2 * m + 1][j] & 15) << 4);
}

void load_group_codes(int64_t qtype, const uint8_t* p, uint8_t code[4][QK]) {
    if (qtype == kQ8_0) {
        std::memcpy(code, p, 4 * QK);
        return;
    }
    if (qtype == kQ5_0) {
        load_group_q5_0(p, code);
        return;
    }
    for (int m = 0; m < 2; ++m)
        for (int j = 0; j < QK; ++j) {
            code[2 * m][j] = p[32 * m + j] & 15;
            code[2 * m + 1][j] = p[32 * m + j] >> 4;
        }
}

// ---- Q4_K (packed_x4.h): 4 super-blocks per group block ----

constexpr int kX4KHeader = 64;  // d[4], dmin[4], lo[32], hi[16]
constexpr int kX4Q5KBits = kX4KHeader + 512;  // Q5_K: the fifth bits after the nibbles

// A Q4_K block's 256 codes (0..15) in element order, and back.
void q4k_codes(const BlockQ4_K& b, uint8_t code[QK_K]) {
    for (int c = 0; c < 4; ++c)
        for (int l = 0; l < 32; ++l) {
            code[64 * c + l] = b.qs[32 * c + l] & 15;
            code[64 * c + 32 + l] = b.qs[32 * c + l] >> 4;
        }
}

void set_q4k_codes(const uint8_t code[QK_K], BlockQ4_K& b) {
    for (int c = 0; c < 4; ++c)
        for (int l = 0; l < 32; ++l) b.qs[32 * c + l] = uint8_t(code[64 * c + l] | code[64 * c + 32 + l] << 4);
}

// A Q5_K block's 256 codes (0..31) in element order, and back: Q4_K's nibbles, and bit 4
// from qh (bit j of qh[l] belongs to element 32 j + l).
void q5k_codes(const BlockQ5_K& b, uint8_t code[QK_K]) {
    for (int c = 0; c < 4; ++c)
        for (int l = 0; l < 32; ++l) {
            code[64 * c + l] = uint8_t((b.qs[32 * c + l] & 15) | ((b.qh[l] >> (2 * c)) & 1) << 4);
            code[64 * c + 32 + l] = uint8_t((b.qs[32 * c + l] >> 4) | ((b.qh[l] >> (2 * c + 1)) & 1) << 4);
        }
}

void set_q5k_codes(const uint8_t code[QK_K], BlockQ5_K& b) {
    std::memset(b.qh, 0, sizeof(b.qh));
    for (int c = 0; c < 4; ++c)
        for (int l = 0; l < 32; ++l) {
            const uint8_t lo = code[64 * c + l], hi = code[64 * c + 32 + l];
            b.qs[32 * c + l] = uint8_t((lo & 15) | (hi & 15) << 4);
            b.qh[l] = uint8_t(b.qh[l] | (lo >> 4) << (2 * c) | (hi >> 4) << (2 * c + 1));
        }
}

void block_k4_codes(const BlockQ4_K& b, uint8_t code[QK_K]) { q4k_codes(b, code); }
void block_k4_codes(const BlockQ5_K& b, uint8_t code[QK_K]) { q5k_codes(b, code); }
void set_block_k4_codes(const uint8_t code[QK_K], BlockQ4_K& b) { set_q4k_codes(code, b); }
void set_block_k4_codes(const uint8_t code[QK_K], BlockQ5_K& b) { set_q5k_codes(code, b); }

// The 12 packed scale bytes from 8 six-bit scales and mins (the inverse of k_scale_min).
void pack_k_scales(const uint8_t sc[8], const uint8_t m[8], uint8_t s[12]) {
    for (int j = 0; j < 4; ++j) {
        s[j] = uint8_t((sc[j] & 63) | (sc[j + 4] >> 4) << 6);
        s[j + 4] = uint8_t((m[j] & 63) | (m[j + 4] >> 4) << 6);
        s[j + 8] = uint8_t((sc[j + 4] & 15) | (m[j + 4] & 15) << 4);
    }
}

// Byte positions of sc[r][j] in SC and of m[r][j] in MN.
int x4k_sc_index(int r, int j) { return 16 * (j / 4) + 4 * (j % 4) + r; }
int x4k_mn_index(int r, int j) {
    const int q = j / 4, L = r + 4 * ((j % 4) / 2), t = j % 2;
    return 16 * q + 2 * L + t;
}

// Q4_K and Q5_K ("K4": Q5_K's group block is Q4_K's, then the fifth bits: packed_x4.h).
template <class B>
void pack_group_k4(const B* const* blk, uint8_t* p) {
    uint8_t code[4][QK_K] = {}, SC[32] = {}, MN[32] = {};
    uint16_t d[4] = {0, 0, 0, 0}, dmin[4] = {0, 0, 0, 0};
    for (int r = 0; r < 4; ++r) {
        if (blk[r] == nullptr) continue;  // padding row: d = dmin = 0, codes 0
        d[r] = blk[r]->d;
        dmin[r] = blk[r]->dmin;
        block_k4_codes(*blk[r], code[r]);
        for (int j = 0; j < 8; ++j) k_scale_min(j, blk[r]->scales, &SC[x4k_sc_index(r, j)], &MN[x4k_mn_index(r, j)]);
    }
    std::memcpy(p, d, 8);
    std::memcpy(p + 8, dmin, 8);
    for (int i = 0; i < 32; ++i) p[16 + i] = uint8_t((SC[i] & 15) | (MN[i] & 15) << 4);
    for (int c = 0; c < 16; ++c)
        p[48 + c] = uint8_t(SC[c] >> 4 | (SC[c + 16] >> 4) << 2 | (MN[c] >> 4) << 4 | (MN[c + 16] >> 4) << 6);
    for (int pr = 0; pr < 4; ++pr)
        for (int m = 0; m < 4; ++m)
            for (int b = 0; b < 32; ++b) {
                const int r = x4_row(b);
                p[kX4KHeader + 128 * pr + 32 * m + b] =
                    uint8_t((code[r][x4k_element(pr, 2 * m, b)] & 15) | (code[r][x4k_element(pr, 2 * m + 1, b)] & 15) << 4);
            }
    if constexpr (std::is_same_v<B, BlockQ5_K>) {
        for (int pr = 0; pr < 4; ++pr)
            for (int b = 0; b < 32; ++b) {
                uint8_t h = 0;
                for (int v = 0; v < 8; ++v) h = uint8_t(h | (code[x4_row(b)][x4k_element(pr, v, b)] >> 4) << v);
                p[kX4Q5KBits + 32 * pr + b] = h;
            }
    }
}

template <class B>
void unpack_group_k4(const uint8_t* p, B* const* blk) {
    uint8_t SC[32], MN[32];
    for (int i = 0; i < 32; ++i) {
        const int c = i % 16, h = i / 16;
        SC[i] = uint8_t((p[16 + i] & 15) | ((p[48 + c] >> (2 * h)) & 3) << 4);
        MN[i] = uint8_t((p[16 + i] >> 4) | ((p[48 + c] >> (4 + 2 * h)) & 3) << 4);
    }
    for (int r = 0; r < 4; ++r) {
        if (blk[r] == nullptr) continue;
        std::memcpy(&blk[r]->d, p + 2 * r, 2);
        std::memcpy(&blk[r]->dmin, p + 8 + 2 * r, 2);
        uint8_t sc[8], m[8], code[QK_K];
        for (int j = 0; j < 8; ++j) {
            sc[j] = SC[x4k_sc_index(r, j)];
            m[j] = MN[x4k_mn_index(r, j)];
        }
        pack_k_scales(sc, m, blk[r]->scales);
        for (int pr = 0; pr < 4; ++pr)
            for (int v = 0; v < 8; ++v)
                for (int b = 0; b < 32; ++b) {
                    if (x4_row(b) != r) continue;
                    const uint8_t byte = p[kX4KHeader + 128 * pr + 32 * (v / 2) + b];
                    uint8_t c = v % 2 ? byte >> 4 : byte & 15;
                    if constexpr (std::is_same_v<B, BlockQ5_K>) c = uint8_t(c | ((p[kX4Q5KBits + 32 * pr + b] >> v) & 1) << 4);
                    code[x4k_element(pr, v, b)] = c;
                }
        set_block_k4_codes(code, *blk[r]);
    }
}

// ---- Q6_K (packed_x4.h): 4 super-blocks per group block ----

constexpr int kX4Q6Header = 72;  // d[4], sc[4][16]

// A Q6_K block's 256 unsigned codes (0..63) in element order, and back.
void q6k_codes(const BlockQ6_K& b, uint8_t code[QK_K]) {
    for (int e = 0; e < QK_K; ++e) {
        const int n = e / 128, quarter = (e % 128) / 32, l = e % 32;
        const uint8_t ql = b.ql[64 * n + l + 32 * (quarter & 1)];
        const int lo = quarter >= 2 ? ql >> 4 : ql & 15;
        code[e] = uint8_t(lo | ((b.qh[32 * n + l] >> (2 * quarter)) & 3) << 4);
    }
}

void set_q6k_codes(const uint8_t code[QK_K], BlockQ6_K& b) {
    std::memset(b.ql, 0, sizeof(b.ql));
    std::memset(b.qh, 0, sizeof(b.qh));
    for (int e = 0; e < QK_K; ++e) {
        const int n = e / 128, quarter = (e % 128) / 32, l = e % 32;
        b.ql[64 * n + l + 32 * (quarter & 1)] |= uint8_t((code[e] & 15) << (quarter >= 2 ? 4 : 0));
        b.qh[32 * n + l] |= uint8_t((code[e] >> 4) << (2 * quarter));
    }
}

// Byte position of row r's scale of 16-element sub-block s in sc[4][16].
int x4q6_sc_index(int r, int s) {
    const int h = s / 8, p = (s % 8) / 2, t = s % 2;
    return 16 * p + 8 * h + 2 * r + t;
}

// Code 3 of a Q6_K half-pair from its planes a, b, c (what x4q6_codes computes, byte by byte):
// (a >> 6 ^ b >> 4 ^ c >> 2) & 63 in 16-bit lanes.
uint8_t x4q6_code3(const uint8_t* a, const uint8_t* b, const uint8_t* c, int j) {
    return uint8_t((srl16_byte(a, j, 6) ^ srl16_byte(b, j, 4) ^ srl16_byte(c, j, 2)) & 63);
}

// Half t of pair p (codes 4t..4t+3, 96 bytes at x): codes 0..2 go to bits 0..5 of the planes
// a, b, c. Code 3's bits 0..1, 2..3 and 4..5 each get one free bit pair, a's, b's and c's
// bits 6..7; the other terms there are code 0..2 bits of this byte or the next, already
// set. So: planes with codes 0..2, then each free pair = the wanted bits xor code3 as it
// comes out with the free pairs still 0.
void store_q6k_half(const uint8_t code[4][32], uint8_t* x) {
    uint8_t *a = x, *b = x + 32, *c = x + 64;
    for (int j = 0; j < 32; ++j) {
        a[j] = code[0][j];
        b[j] = code[1][j];
        c[j] = code[2][j];
    }
    uint8_t fix[32];
    for (int j = 0; j < 32; ++j) fix[j] = uint8_t(code[3][j] ^ x4q6_code3(a, b, c, j));
    for (int j = 0; j < 32; ++j) {
        a[j] = uint8_t(a[j] | (fix[j] & 3) << 6);
        b[j] = uint8_t(b[j] | (fix[j] >> 2 & 3) << 6);
        c[j] = uint8_t(c[j] | (fix[j] >> 4 & 3) << 6);
    }
}

void load_q6k_half(const uint8_t* x, uint8_t code[4][32]) {
    const uint8_t *a = x, *b = x + 32, *c = x + 64;
    for (int j = 0; j < 32; ++j) {
        code[0][j] = a[j] & 63;
        code[1][j] = b[j] & 63;
        code[2][j] = c[j] & 63;
        code[3][j] = x4q6_code3(a, b, c, j);
    }
}

void pack_group_q6k(const BlockQ6_K* const* blk, uint8_t* p) {
    uint8_t code[4][QK_K] = {};
    uint16_t d[4] = {0, 0, 0, 0};
    std::memset(p, 0, kX4Q6Header);
    for (int r = 0; r < 4; ++r) {
        if (blk[r] == nullptr) continue;  // padding row: d = 0, codes and scales 0
        d[r] = blk[r]->d;
        q6k_codes(*blk[r], code[r]);
        for (int s = 0; s < 16; ++s) p[8 + x4q6_sc_index(r, s)] = uint8_t(blk[r]->scales[s]);
    }
    std::memcpy(p, d, 8);
    for (int pr = 0; pr < 4; ++pr)
        for (int t = 0; t < 2; ++t) {
            uint8_t c[4][32];
            for (int k = 0; k < 4; ++k)
                for (int b = 0; b < 32; ++b) c[k][b] = code[x4_row(b)][x4k_element(pr, 4 * t + k, b)];
            store_q6k_half(c, p + kX4Q6Header + 192 * pr + 96 * t);
        }
}

void unpack_group_q6k(const uint8_t* p, BlockQ6_K* const* blk) {
    uint8_t code[4][QK_K] = {};
    for (int pr = 0; pr < 4; ++pr)
        for (int t = 0; t < 2; ++t) {
            uint8_t c[4][32];
            load_q6k_half(p + kX4Q6Header + 192 * pr + 96 * t, c);
            for (int k = 0; k < 4; ++k)
                for (int b = 0; b < 32; ++b) code[x4_row(b)][x4k_element(pr, 4 * t + k, b)] = c[k][b];
        }
    for (int r = 0; r < 4; ++r) {
        if (blk[r] == nullptr) continue;
        std::memcpy(&blk[r]->d, p + 2 * r, 2);
        for (int s = 0; s < 16; ++s) blk[r]->scales[s] = int8_t(p[8 + x4q6_sc_index(r, s)]);
        set_q6k_codes(code[r], *blk[r]);
    }
}

// A 32-element type's group block: the 4 row blocks blk[r] (nullptr: padding row, d = 0,
// codes 0) <-> the group block at p.
void pack_group_32(int64_t qtype, const uint8_t* const* blk, uint8_t* p) {
    uint8_t row_code[4][QK] = {};
    uint16_t d[4] = {0, 0, 0, 0};
    for (int r = 0; r < 4; ++r) {
        if (blk[r] == nullptr) continue;
        std::memcpy(&d[r], blk[r], 2);
        block_codes(qtype, blk[r], row_code[r]);
    }
    uint8_t code[4][QK];
    for (int v = 0; v < 4; ++v)
        for (int j = 0; j < QK; ++j) code[v][j] = row_code[x4_row(j)][x4_element(v, j)];
    std::memcpy(p, d, 8);
    store_group_codes(qtype, code, p + 8);
}

void unpack_group_32(int64_t qtype, const uint8_t* p, uint8_t* const* blk) {
    uint8_t code[4][QK];
    load_group_codes(qtype, p + 8, code);
    uint8_t row_code[4][QK];
    for (int v = 0; v < 4; ++v)
        for (int j = 0; j < QK; ++j) row_code[x4_row(j)][x4_element(v, j)] = code[v][j];
    for (int r = 0; r < 4; ++r) {
        if (blk[r] == nullptr) continue;
        std::memcpy(blk[r], p + 2 * r, 2);
        set_block_codes(qtype, row_code[r], blk[r]);
    }
}

// Calls fn(group block i of group g, its 4 row blocks) for every group block; a row past
// n_rows (the padding of the last group) is passed as nullptr.
template <class Byte, class Fn>
void for_each_group_block(int64_t n_rows, int nb, size_t row_bytes, int block_bytes, Byte* rows, Fn fn) {
    for (int64_t g = 0; g < (n_rows + 3) / 4; ++g)
        for (int i = 0; i < nb; ++i) {
            Byte* blk[4];
            for (int r = 0; r < 4; ++r)
                blk[r] = 4 * g + r < n_rows ? rows + size_t(4 * g + r) * row_bytes + size_t(i) * block_bytes : nullptr;
            fn(size_t(g) * nb + i, blk);
        }
}

}  // namespace

void pack_x4(int64_t qtype, const uint8_t* rows, size_t row_bytes, int64_t n_rows, int nb, uint8_t* out) {
    const int gb = x4_group_bytes(qtype);
    for_each_group_block(n_rows, nb, row_bytes, row_block_bytes(qtype), rows, [&](size_t gi, const uint8_t** blk) {
        uint8_t* p = out + gi * gb;
        if (qtype == kQ4_K) {
            pack_group_k4(reinterpret_cast<const BlockQ4_K* const*>(blk), p);
        } else if (qtype == kQ5_K) {
            pack_group_k4(reinterpret_cast<const BlockQ5_K* const*>(blk), p);
        } else if (qtype == kQ6_K) {
            pack_group_q6k(reinterpret_cast<const BlockQ6_K* const*>(blk), p);
        } else {
            pack_group_32(qtype, blk, p);
        }
    });
}

void unpack_x4(int64_t qtype, const uint8_t* packed, int64_t n_rows, int nb, uint8_t* rows) {
    const int bb = row_block_bytes(qtype), gb = x4_group_bytes(qtype);
    for_each_group_block(n_rows, nb, size_t(nb) * bb, bb, rows, [&](size_t gi, uint8_t** blk) {
        const uint8_t* p = packed + gi * gb;
        if (qtype == kQ4_K) {
            unpack_group_k4(p, reinterpret_cast<BlockQ4_K* const*>(blk));
        } else if (qtype == kQ5_K) {
            unpack_group_k4(p, reinterpret_cast<BlockQ5_K* const*>(blk));
        } else if (qtype == kQ6_K) {
            unpack_group_q6k(p, reinterpret_cast<BlockQ6_K* const*>(blk));
        } else {
            unpack_group_32(qtype, p, blk);
        }
    });
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

void expand_act_kx4(const void* q8k, int nb, void* out) {
    const auto* a = static_cast<const BlockQ8K*>(q8k);
    auto* o = static_cast<BlockQ8KX4*>(out);
    for (int i = 0; i < nb; ++i) {
        kx4_sums(a[i], o[i]);
        std::memcpy(o[i].qs, a[i].qs, QK_K);
    }
}

void expand_act_kx4l(const void* q8k, int nb, void* out) {
    const auto* a = static_cast<const BlockQ8K*>(q8k);
    auto* o = static_cast<BlockQ8KX4L*>(out);
    for (int i = 0; i < nb; ++i) {
        kx4_sums(a[i], o[i]);
        for (int p = 0; p < 4; ++p)
            for (int v = 0; v < 8; ++v)
                for (int b = 0; b < QK; ++b) o[i].qs[p][v][b] = a[i].qs[x4k_element(p, v, b)];
    }
}

}  // namespace tp_numa::quant
