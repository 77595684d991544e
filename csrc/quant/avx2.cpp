// AVX2 + FMA + F16C kernels (the baseline SIMD path, tested on the project machine).
#pragma GCC target("avx2,fma,f16c")
#define TPN_ISA_NAME "avx2"
#define TPN_KERNELS_FN avx2_kernels
#include "quant/simd_kernels.inc"
