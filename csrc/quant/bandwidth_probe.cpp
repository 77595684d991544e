// STREAM-like read kernel: the machine's read bandwidth, measured in the same run as the
// matmul benchmark (scripts/bench_matmul.py) so ratios compare like with like.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <atomic>
#include <chrono>

#include "quant/quant_ops.h"

namespace tp_numa {
namespace {

std::atomic<uint64_t> g_sink{0};  // keeps the reads observable

// Sum of all 32-byte words in [p, p + n), read as S interleaved sequential streams, with
// (PF) or without a software prefetch `pf` bytes ahead of each stream. Which pattern reads
// fastest depends on the machine (hardware prefetchers, memory-level parallelism per core),
// so the benchmark takes the best of several: a kernel that streams faster than every
// pattern would show the probe under-states the bandwidth.
template <int S, bool PF>
__attribute__((target("avx2"))) uint64_t read_avx2(const uint8_t* p, size_t n, size_t pf) {
    const size_t sub = n / S / 64 * 64;
    __m256i a0 = _mm256_setzero_si256(), a1 = _mm256_setzero_si256();
    for (size_t i = 0; i < sub; i += 64) {
        for (int s = 0; s < S; ++s) {
            const uint8_t* q = p + s * sub + i;
            if constexpr (PF) _mm_prefetch(reinterpret_cast<const char*>(q + pf), _MM_HINT_T0);
            a0 = _mm256_add_epi64(a0, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q)));
            a1 = _mm256_add_epi64(a1, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + 32)));
        }
    }
    uint64_t out[4];
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out), _mm256_add_epi64(a0, a1));
    uint64_t r = out[0] + out[1] + out[2] + out[3];
    for (size_t i = S * sub; i < n; ++i) r += p[i];
    return r;
}

template <bool PF>
uint64_t read_streams(const uint8_t* p, size_t n, int streams, size_t pf) {
    switch (streams) {
        case 1: return read_avx2<1, PF>(p, n, pf);
        case 2: return read_avx2<2, PF>(p, n, pf);
        case 3: return read_avx2<3, PF>(p, n, pf);
        case 4: return read_avx2<4, PF>(p, n, pf);
        default: return read_avx2<8, PF>(p, n, pf);
    }
}

uint64_t read_generic(const uint8_t* p, size_t n) {
    uint64_t r0 = 0, r1 = 0, r2 = 0, r3 = 0, w[4];
    size_t i = 0;
    for (; i + 32 <= n; i += 32) {
        std::memcpy(w, p + i, 32);
        r0 += w[0]; r1 += w[1]; r2 += w[2]; r3 += w[3];
    }
    for (; i < n; ++i) r0 += p[i];
    return r0 + r1 + r2 + r3;
}

}  // namespace

double read_bandwidth_probe(const at::Tensor& buf, int64_t repeats, int64_t streams, int64_t prefetch_bytes) {
    TORCH_CHECK(buf.device().is_cpu() && buf.is_contiguous() && buf.scalar_type() == at::kByte,
                "read_bandwidth_probe: buf must be a contiguous CPU uint8 tensor");
    TORCH_CHECK(repeats >= 1, "read_bandwidth_probe: repeats must be >= 1, got ", repeats);
    TORCH_CHECK(streams == 1 || streams == 2 || streams == 3 || streams == 4 || streams == 8,
                "read_bandwidth_probe: streams must be 1, 2, 3, 4 or 8, got ", streams);
    TORCH_CHECK(prefetch_bytes >= 0, "read_bandwidth_probe: prefetch_bytes must be >= 0, got ", prefetch_bytes);
    const uint8_t* p = buf.data_ptr<uint8_t>();
    const int64_t n = buf.numel();
    const bool avx2 = __builtin_cpu_supports("avx2");
    const size_t pf = size_t(prefetch_bytes);
    const int64_t chunk = 1 << 20;  // split evenly; each thread reads its own range
    const auto t0 = std::chrono::steady_clock::now();
    for (int64_t r = 0; r < repeats; ++r) {
        at::parallel_for(0, (n + chunk - 1) / chunk, 1, [&](int64_t c0, int64_t c1) {
            const int64_t b = c0 * chunk, e = std::min(n, c1 * chunk);
            const uint64_t s = !avx2 ? read_generic(p + b, e - b)
                               : pf ? read_streams<true>(p + b, e - b, int(streams), pf)
                                    : read_streams<false>(p + b, e - b, int(streams), pf);
            g_sink.fetch_add(s, std::memory_order_relaxed);
        });
    }
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

}  // namespace tp_numa
