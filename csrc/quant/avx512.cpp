// AVX-512 F/BW/VL kernels: the AVX2 algorithms with AVX-512VL encodings available to the
// compiler. Chosen at run time on CPUs that have AVX-512; NOT tested on the project machine
// (Zen3, no AVX-512) — only compiled there.
#pragma GCC target("avx2,fma,f16c,avx512f,avx512bw,avx512vl")
#define TPN_ISA_NAME "avx512"
#define TPN_KERNELS_FN avx512_kernels
#include "quant/simd_kernels.inc"
