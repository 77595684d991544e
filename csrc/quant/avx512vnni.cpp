// AVX-512 + VNNI kernels: the byte dot products use vpdpbusd (u8 x s8 -> s32 accumulate in
// one instruction) instead of vpmaddubsw + vpmaddwd. Chosen at run time on CPUs with
// AVX512-VNNI; NOT tested on the project machine (Zen3, no AVX-512) — only compiled there.
#pragma GCC target("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")
#define TPN_ISA_NAME "avx512vnni"
#define TPN_KERNELS_FN avx512vnni_kernels
#define TPN_VNNI 1
#include "quant/simd_kernels.inc"
