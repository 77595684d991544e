// The "x4" weight layout: four GGUF rows interleaved block by block, made once at load
// time for the types whose GEMV is compute-bound in the row layout (Q4_0, Q5_0, Q8_0,
// Q4_K, Q5_K, Q6_K). Same bytes per weight as GGUF (a group block is 4 row blocks), no float copy.
//
// Rows 4g..4g+3 form group g (the last group of N % 4 != 0 rows is padded with zero
// blocks, whose scale d = 0 makes them contribute nothing). A packed weight is uint8
// [ceil(N / 4), nb * group_bytes]: group g's blocks in column order, and group block i is
//
//   d[4]        f16 scales of rows 4g..4g+3, block i                     8 bytes
//   codes       the 4 x 32 weight codes of the block, in "lane order":
//               code vector v (0..3), byte j (0..31) = row (j / 4) % 4, element
//               4 * (2v + j / 16) + j % 4 of the block.
//     Q4_0:  qs[64]: byte j of half m (0, 1) = code[2m][j] | code[2m+1][j] << 4   64 bytes
//     Q5_0:  qh[16], a[32], b[32]                                             80 bytes
//            code[0][j] = a[j] & 31, code[1][j] = b[j] & 31, and (16-bit lanes for
//            >> 5, 64-bit lanes for the qh shifts, qh broadcast to both halves)
//            code[2] = ((a >> 5) ^ (qh >> (1 | 3))) & 31  (shift 1 in the low half, 3 high)
//            code[3] = ((b >> 5) ^ (qh << (3 | 1))) & 31  (shift 3 in the low half, 1 high)
//            The packer sets qh from codes 2/3's bits 3..4 and the bits a >> 5 / b >> 5
//            carry in from the next byte (codes 0/1), then a's / b's top 3 bits so that
//            bits 0..2 come out right (packed_x4.cpp, store_group_q5_0).
//     Q8_0:  qs[128]: code[v][j] at 32v + j (signed)                            128 bytes
//
// Why: each 32-bit lane of a code vector holds 4 consecutive elements of one row, so one
// vpmaddubsw + vpmaddwd against an activation vector whose lanes repeat the matching 4
// activation bytes ("BlockQ8AX4", prepared once per call) gives every row's partial sum in
// its own lanes: no horizontal sums, one scale vector d[4] per group block, the activation
// loads shared by 4 rows, and a single prefetch stream. Q5_0's codes unpack with 10 vector
// uops for the 4 vectors (Q4_0's nibble planes and a fifth bit placed per vector took 18:
// in cache 1.15-1.23x, from DRAM at 1 thread 0.70-0.81 -> 0.84-0.89 of the probe).
//
// Q4_K (a group block is 4 super-blocks of 256 elements, 576 bytes): sub-block j (0..7)
// of the 4 rows is dotted in the same lane order, with sub-blocks j and j + 4 sharing
// vectors (low / high 128-bit half), so that one vpmaddwd applies the 4 rows' 6-bit
// scales of both to 8 summed vpmaddubsw results. Lane order: code vector v (0..7) of pair
// p (0..3), byte b = 16h + c (half h, c in 0..15) = row c / 4, element
// 32 (p + 4h) + 4v + c % 4 of the super-block. Bytes:
//   d[4], dmin[4]  f16 of rows 0..3                                            16 bytes
//   lo[32]         byte i = SC[i] & 15 | (MN[i] & 15) << 4                     32 bytes
//   hi[16]         byte c = SC[c] >> 4 | SC[c + 16] >> 4 << 2 | MN[c] >> 4 << 4
//                           | MN[c + 16] >> 4 << 6                             16 bytes
//   qs[4][4][32]   pair p, half-vector m: byte b = code[p][2m][b] | code[p][2m+1][b] << 4
//                                                                              512 bytes
// with the 6-bit scales sc[r][j] and mins m[r][j] stored as
//   SC[16h + 4p + r] = sc[r][p + 4h]       (one vpshufb per pair broadcasts a row's scale
//                                           to its lanes: low half j = p, high j = p + 4)
//   MN[16q + 2L + t] = m[L % 4][4q + 2(L / 4) + t]   (vpmovzxbw of MN[16q..] times the
//                                           activation's sub-block sums, BlockQ8KX4::bsum,
//                                           gives row L % 4's mins term in int32 lane L)
// Both unpack with 10 vector uops per group block (two 64-bit variable shifts bring the
// high bits to bit 4). The 8 vpmaddubsw of a pair sum in int16 without overflow (codes
// <= 15, |a| <= 127: 8 * 2 * 15 * 127 = 30480).
//
// Q5_K (4 super-blocks, 704 bytes) is Q4_K's group block (the same d, dmin, scales, mins
// and low-nibble planes), then the fifth bits:
//   qh[4][32]      pair p, byte b: bit v = bit 4 of code[p][v][b]            128 bytes
// A 16-bit shift by 4 - v (left) or v - 4 (right) and an `and` bring bit v to bit 4 of
// each byte (bits carried in from the neighbouring byte land elsewhere). Codes are 0..31,
// so four vpmaddubsw sum in int16 (4 * 2 * 31 * 127 = 31496): two vpmaddwd per pair.
//
// Q6_K (4 super-blocks, 840 bytes) uses Q4_K's code-vector order, in which vectors 4t..4t+3
// of pair p hold the 16-element sub-blocks g = 2p + t (low half) and g + 8 (high half):
//   d[4]           f16 of rows 0..3                                             8 bytes
//   sc[4][16]      int8: sc[p][8h + 2r + t] = scale of row r, sub-block 8h + 2p + t: the
//                  vpmovsxbw of sc[p] times the activation's 16-element sums
//                  (BlockQ8KX4::bsum16) gives each row's "32 * sum sc * bsum" term in its
//                  lanes, and one vpshufb of it per t is the scale vector of sub-block
//                  pair g                                                       64 bytes
//   qs[4][2][96]   pair p, half t: planes a[32], b[32], c[32] of codes 4t..4t+3 (the
//                  unsigned code u = q + 32 in 0..63): codes 4t..4t+2 = bits 0..5 of a, b,
//                  c; code 4t+3 = (a >> 6 ^ b >> 4 ^ c >> 2) & 63 in 16-bit lanes, the
//                  top 2 bits of a / b / c set by the packer to give code 4t+3's bits
//                  0..1 / 2..3 / 4..5 (packed_x4.cpp, store_q6k_half)       768 bytes
// Two vpmaddubsw sum in int16 (2 * 2 * 63 * 127 = 32004) before each vpmaddwd.
//
// The arithmetic for a row depends only on that row (each lane sees one row), so results
// do not depend on how rows are grouped, split over threads or over tp ranks.
#pragma once
#include <cstddef>
#include <cstdint>

#include "quant/blocks.h"

namespace tp_numa::quant {

// Activation block for x4 kernels: BlockQ8A's values, repeated in lane order:
// qs[v][j] = a[4 * (2v + j / 16) + j % 4] (4 x 32 bytes), d and s as in BlockQ8A.
struct BlockQ8AX4 { float d; float s; int8_t qs[4][QK]; };
static_assert(sizeof(BlockQ8AX4) == 136, "Q8AX4 block");

// Activation super-block for the Q4_K, Q5_K and Q6_K x4 kernels: BlockQ8K's d and values (qs,
// element order), and its sub-block sums arranged for the kernels: the 32-element sums
// bsum32[j] = bsums[2j] + bsums[2j + 1] as the MN bytes, bsum[q][2L + t] =
// bsum32[4q + 2(L / 4) + t], and for Q6_K bsum16[p][8h + 2r + t] = bsums[8h + 2p + t] (the
// same for every r). The kernels build lane-order vector v of pair p (bytes
// a[32 (p + 4h) + 4v + c % 4]) from two dword broadcast loads (dwords 8p + v and
// 8p + 32 + v of qs) and one vpblendd: a compact row (452 bytes per 256 elements instead
// of 4 x 256 expanded bytes) keeps a K = 4096 activation at 7 KiB, in L1 next to the
// weight stream (the expanded form, 19.5 KiB, streamed 12-17 % slower from DRAM at
// K = 4096-8192).
struct BlockQ8KX4 { float d; int16_t bsum[2][16]; int16_t bsum16[4][16]; int8_t qs[QK_K]; };
static_assert(sizeof(BlockQ8KX4) == 452, "Q8KX4 block");

// The prefill (M >= 2) form: the same sums, and the values already in lane order,
// qs[p][v][16h + c] = a[32 (p + 4h) + 4v + c % 4] (1220 bytes). The micro-kernels reuse a
// group block for several activation rows and are compute-bound: loading prepared vectors
// beats rebuilding them per group (Q6_K GEMM M=512: 100 against 81 GFLOP/s).
struct BlockQ8KX4L { float d; int16_t bsum[2][16]; int16_t bsum16[4][16]; int8_t qs[4][8][QK]; };
static_assert(sizeof(BlockQ8KX4L) == 1220, "Q8KX4L block");

// Bytes of one group block (4 row blocks) of a packable type; 0 if the type has no x4 form.
inline int x4_group_bytes(int64_t qtype) {
    switch (qtype) {
        case kQ4_0: return 4 * 18;
        case kQ5_0: return 4 * 22;
        case kQ8_0: return 4 * 34;
        case kQ4_K: return 4 * 144;
        case kQ5_K: return 4 * 176;
        case kQ6_K: return 4 * 210;
        default: return 0;
    }
}

// Element of the block that lane-order byte j of code vector v holds, and its row.
inline int x4_element(int v, int j) { return 4 * (2 * v + j / 16) + j % 4; }
inline int x4_row(int j) { return (j / 4) % 4; }
// Q4_K / Q5_K / Q6_K: element of the super-block that byte b of code vector v of pair p holds
// (row x4_row(b)).
inline int x4k_element(int p, int v, int b) { return 32 * (p + 4 * (b / 16)) + 4 * v + b % 4; }

// rows: n_rows raw GGUF rows of nb blocks (row_bytes apart); out: ceil(n_rows / 4) groups.
void pack_x4(int64_t qtype, const uint8_t* rows, size_t row_bytes, int64_t n_rows, int nb, uint8_t* out);
// The inverse: writes n_rows raw GGUF rows (padding rows dropped).
void unpack_x4(int64_t qtype, const uint8_t* packed, int64_t n_rows, int nb, uint8_t* rows);
// Activation row (BlockQ8A blocks) -> lane-order BlockQ8AX4 blocks.
void expand_act_x4(const void* q8a, int nb, void* out);
// The sub-block sums both K-quant activation forms carry (and d), from a BlockQ8K.
template <class Out>
inline void kx4_sums(const BlockQ8K& a, Out& o) {
    o.d = a.d;
    for (int q = 0; q < 2; ++q)
        for (int L = 0; L < 8; ++L)
            for (int t = 0; t < 2; ++t) {
                const int j = 4 * q + 2 * (L / 4) + t;
                o.bsum[q][2 * L + t] = int16_t(a.bsums[2 * j] + a.bsums[2 * j + 1]);
            }
    for (int p = 0; p < 4; ++p)
        for (int h = 0; h < 2; ++h)
            for (int r = 0; r < 4; ++r)
                for (int t = 0; t < 2; ++t) o.bsum16[p][8 * h + 2 * r + t] = a.bsums[8 * h + 2 * p + t];
}

// Activation row (BlockQ8K super-blocks) -> BlockQ8KX4 / BlockQ8KX4L super-blocks.
void expand_act_kx4(const void* q8k, int nb, void* out);
void expand_act_kx4l(const void* q8k, int nb, void* out);

// y[4g + r] = dot(row 4g + r, act) for the groups [0, ngroups) starting at w (group_stride
// bytes apart); act = BlockQ8AX4 (BlockQ8KX4 for the K-quants) blocks. Out = float (Fast) or double (Exact).
using RowsX4Fn = void (*)(int nb, const uint8_t* w, size_t group_stride, int ngroups, const void* act, float* y);
using RowsX4ExactFn = void (*)(int nb, const uint8_t* w, size_t group_stride, int ngroups, const void* act,
                               double* y);
// Prefill: y[m * y_stride + 4g + r] for mrows activation rows act + m * act_stride
// (BlockQ8AX4, or BlockQ8KX4L for the K-quants).
using TileX4Fn = void (*)(int nb, const uint8_t* w, size_t group_stride, int ngroups, const uint8_t* act,
                          size_t act_stride, int mrows, float* y, size_t y_stride);
using TileX4ExactFn = void (*)(int nb, const uint8_t* w, size_t group_stride, int ngroups, const uint8_t* act,
                               size_t act_stride, int mrows, double* y, size_t y_stride);

}  // namespace tp_numa::quant
