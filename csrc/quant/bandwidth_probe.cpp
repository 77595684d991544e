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

// Sum of all 32-byte words in [p, p + n), read as kStreams interleaved sequential streams
// (like a GEMV reading several weight rows at once): one stream leaves DRAM parallelism
// unused and would under-state the bandwidth the kernels can reach.
constexpr int kStreams = 8;

__attribute__((target("avx2"))) uint64_t read_avx2(const uint8_t* p, size_t n) {
    const size_t sub = n / kStreams / 64 * 64;
    __m256i acc[kStreams];
    for (auto& a : acc) a = _mm256_setzero_si256();
    for (size_t i = 0; i < sub; i += 64) {
        for (int s = 0; s < kStreams; ++s) {
            const uint8_t* q = p + s * sub + i;
            acc[s] = _mm256_add_epi64(acc[s], _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q)));
            acc[s] = _mm256_add_epi64(acc[s], _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + 32)));
        }
    }
    __m256i t = acc[0];
    for (int s = 1; s < kStreams; ++s) t = _mm256_add_epi64(t, acc[s]);
    uint64_t out[4];
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out), t);
    uint64_t r = out[0] + out[1] + out[2] + out[3];
    for (size_t i = kStreams * sub; i < n; ++i) r += p[i];
    return r;
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

double read_bandwidth_probe(const at::Tensor& buf, int64_t repeats) {
    TORCH_CHECK(buf.device().is_cpu() && buf.is_contiguous() && buf.scalar_type() == at::kByte,
                "read_bandwidth_probe: buf must be a contiguous CPU uint8 tensor");
    TORCH_CHECK(repeats >= 1, "read_bandwidth_probe: repeats must be >= 1, got ", repeats);
    const uint8_t* p = buf.data_ptr<uint8_t>();
    const int64_t n = buf.numel();
    const bool avx2 = __builtin_cpu_supports("avx2");
    const int64_t chunk = 1 << 20;  // split evenly; each thread reads its own range
    const auto t0 = std::chrono::steady_clock::now();
    for (int64_t r = 0; r < repeats; ++r) {
        at::parallel_for(0, (n + chunk - 1) / chunk, 1, [&](int64_t c0, int64_t c1) {
            const int64_t b = c0 * chunk, e = std::min(n, c1 * chunk);
            const uint64_t s = avx2 ? read_avx2(p + b, e - b) : read_generic(p + b, e - b);
            g_sink.fetch_add(s, std::memory_order_relaxed);
        });
    }
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

}  // namespace tp_numa
