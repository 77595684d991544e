// Sum kernels for the shm all-reduce: a scalar reference and an AVX2 (+F16C) version,
// chosen once at run time. Both sum in fp32 in source order and round once, so they
// give bitwise the same result (the AVX2 tail uses the scalar code).
//
// bf16 <-> fp32: bf16 is the top half of an fp32, so widening is a 16-bit shift; narrowing
// rounds to nearest even: u + 0x7FFF + ((u >> 16) & 1), then >> 16 (a NaN stays a quiet NaN).
// fp16 <-> fp32: IEEE conversions, round to nearest even (F16C vcvtph2ps / vcvtps2ph; the
// scalar path uses the compiler's _Float16).
#include "comm/shm_reduce.h"

#include <cstdlib>
#include <cstring>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace tp_numa::shm {
namespace {

inline float bf16_to_f32(uint16_t h) { return __builtin_bit_cast(float, static_cast<uint32_t>(h) << 16); }

inline uint16_t f32_to_bf16(float f) {
    uint32_t u = __builtin_bit_cast(uint32_t, f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40u);  // NaN
    u += 0x7fffu + ((u >> 16) & 1u);
    return static_cast<uint16_t>(u >> 16);
}

template <typename T>
struct Io;
template <>
struct Io<float> {
    using Acc = float;
    static float load(const float* p, size_t i) { return p[i]; }
    static void store(float* p, size_t i, float v) { p[i] = v; }
};
template <>
struct Io<uint16_t> {  // bf16 bits
    using Acc = float;
    static float load(const uint16_t* p, size_t i) { return bf16_to_f32(p[i]); }
    static void store(uint16_t* p, size_t i, float v) { p[i] = f32_to_bf16(v); }
};
template <>
struct Io<_Float16> {
    using Acc = float;
    static float load(const _Float16* p, size_t i) { return static_cast<float>(p[i]); }
    static void store(_Float16* p, size_t i, float v) { p[i] = static_cast<_Float16>(v); }
};

template <>
struct Io<double> {
    using Acc = double;
    static double load(const double* p, size_t i) { return p[i]; }
    static void store(double* p, size_t i, double v) { p[i] = v; }
};

// elements [i0, n): one at a time (the reference, and the tail of the SIMD version)
template <typename T>
void sum_scalar(T* dst, const void* const* srcs, int nsrc, size_t i0, size_t n, T* dst2 = nullptr) {
    for (size_t i = i0; i < n; ++i) {
        typename Io<T>::Acc acc = Io<T>::load(static_cast<const T*>(srcs[0]), i);
        for (int k = 1; k < nsrc; ++k) acc += Io<T>::load(static_cast<const T*>(srcs[k]), i);
        Io<T>::store(dst, i, acc);
        if (dst2) Io<T>::store(dst2, i, acc);
    }
}

#if defined(__x86_64__)
#define TP_NUMA_AVX2 __attribute__((target("avx2,f16c")))

// 8 lanes of fp32 from element i of a source of each type
TP_NUMA_AVX2 inline __m256 load8(const float* p, size_t i) { return _mm256_loadu_ps(p + i); }
TP_NUMA_AVX2 inline __m256 load8(const uint16_t* p, size_t i) {
    __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + i)));
    return _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
}
TP_NUMA_AVX2 inline __m256 load8(const _Float16* p, size_t i) {
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + i)));
}

TP_NUMA_AVX2 inline void store8(float* p, size_t i, __m256 v) { _mm256_storeu_ps(p + i, v); }
TP_NUMA_AVX2 inline void store8(uint16_t* p, size_t i, __m256 v) {
    __m256i u = _mm256_castps_si256(v);
    __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    __m256i rounded = _mm256_add_epi32(u, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff)));
    // NaN: (u & 0x7fffffff) > 0x7f800000 -> keep it, quiet (set bit 22)
    __m256i mag = _mm256_and_si256(u, _mm256_set1_epi32(0x7fffffff));
    __m256i nan = _mm256_cmpgt_epi32(mag, _mm256_set1_epi32(0x7f800000));
    __m256i quiet = _mm256_or_si256(u, _mm256_set1_epi32(0x400000));
    __m256i r = _mm256_srli_epi32(_mm256_blendv_epi8(rounded, quiet, nan), 16);
    __m128i packed = _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p + i), packed);
}
TP_NUMA_AVX2 inline void store8(_Float16* p, size_t i, __m256 v) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p + i), _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT));
}

template <typename T>
TP_NUMA_AVX2 void sum_avx2(T* dst, const void* const* srcs, int nsrc, size_t n, T* dst2) {
    size_t i = 0;
    // 32 elements per step: four independent accumulators hide the add latency
    for (; i + 32 <= n; i += 32) {
        const T* s0 = static_cast<const T*>(srcs[0]);
        __m256 a0 = load8(s0, i), a1 = load8(s0, i + 8), a2 = load8(s0, i + 16), a3 = load8(s0, i + 24);
        for (int k = 1; k < nsrc; ++k) {
            const T* sk = static_cast<const T*>(srcs[k]);
            a0 = _mm256_add_ps(a0, load8(sk, i));
            a1 = _mm256_add_ps(a1, load8(sk, i + 8));
            a2 = _mm256_add_ps(a2, load8(sk, i + 16));
            a3 = _mm256_add_ps(a3, load8(sk, i + 24));
        }
        store8(dst, i, a0);
        store8(dst, i + 8, a1);
        store8(dst, i + 16, a2);
        store8(dst, i + 24, a3);
        if (dst2) {
            store8(dst2, i, a0);
            store8(dst2, i + 8, a1);
            store8(dst2, i + 16, a2);
            store8(dst2, i + 24, a3);
        }
    }
    for (; i + 8 <= n; i += 8) {
        __m256 a = load8(static_cast<const T*>(srcs[0]), i);
        for (int k = 1; k < nsrc; ++k) a = _mm256_add_ps(a, load8(static_cast<const T*>(srcs[k]), i));
        store8(dst, i, a);
        if (dst2) store8(dst2, i, a);
    }
    sum_scalar<T>(dst, srcs, nsrc, i, n, dst2);
}

bool use_avx2() {
    // TP_NUMA_KERNEL=scalar (the project-wide switch) forces the reference, for tests
    static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c") &&
                           !(std::getenv("TP_NUMA_KERNEL") && std::strcmp(std::getenv("TP_NUMA_KERNEL"), "scalar") == 0);
    return ok;
}
#else
bool use_avx2() { return false; }
#endif

template <typename T>
void sum_dispatch(void* dst, const void* const* srcs, int nsrc, size_t n, void* dst2) {
#if defined(__x86_64__)
    if (use_avx2()) return sum_avx2<T>(static_cast<T*>(dst), srcs, nsrc, n, static_cast<T*>(dst2));
#endif
    sum_scalar<T>(static_cast<T*>(dst), srcs, nsrc, 0, n, static_cast<T*>(dst2));
}

}  // namespace

void reduce_sum(DType t, void* dst, const void* const* srcs, int nsrc, size_t n, void* dst2) {
    switch (t) {
        case DType::F32: sum_dispatch<float>(dst, srcs, nsrc, n, dst2); break;
        case DType::BF16: sum_dispatch<uint16_t>(dst, srcs, nsrc, n, dst2); break;
        case DType::F16: sum_dispatch<_Float16>(dst, srcs, nsrc, n, dst2); break;
        // short vectors (one activation row per token): the scalar loop is enough
        case DType::F64: sum_scalar<double>(static_cast<double*>(dst), srcs, nsrc, 0, n, static_cast<double*>(dst2)); break;
    }
}

void reduce_sum_ref(DType t, void* dst, const void* const* srcs, int nsrc, size_t n) {
    switch (t) {
        case DType::F32: sum_scalar<float>(static_cast<float*>(dst), srcs, nsrc, 0, n); break;
        case DType::BF16: sum_scalar<uint16_t>(static_cast<uint16_t*>(dst), srcs, nsrc, 0, n); break;
        case DType::F16: sum_scalar<_Float16>(static_cast<_Float16*>(dst), srcs, nsrc, 0, n); break;
        case DType::F64: sum_scalar<double>(static_cast<double*>(dst), srcs, nsrc, 0, n); break;
    }
}

}  // namespace tp_numa::shm
