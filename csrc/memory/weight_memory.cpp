// Weight storage on transparent huge pages (see weight_memory.h).
//
// A decode step streams every weight once; with 4 KiB pages that is a TLB miss (a page
// walk) every 4 KiB of every weight. The measured GEMV and decode gains are in
// docs/kernels.md, "Weight memory" (scripts/bench_weight_memory.py).
//
// Layout of one mapping of n bytes:
//   base ............ aligned = round_up(base, 2 MiB) ... aligned + n ... end
// The slack before `aligned` and after the last 4 KiB page of the tensor is unmapped at
// once; only [aligned, aligned + floor(n, 2 MiB)) is advised, so a tensor never rounds up
// to a whole extra huge page of resident memory (its tail stays on 4 KiB pages).
#include "memory/weight_memory.h"

#include <sys/mman.h>
#include <unistd.h>

#include <cerrno>
#include <cstdlib>
#include <cstring>

namespace tp_numa {
namespace {

constexpr size_t kHugePage = size_t(2) << 20;

size_t round_up(size_t v, size_t a) { return (v + a - 1) / a * a; }

// Whether empty_weight asks for huge pages (TP_NUMA_HUGEPAGES, default on).
bool huge_pages_requested() {
    static const bool on = [] {
        const char* v = std::getenv("TP_NUMA_HUGEPAGES");
        return v == nullptr || std::strcmp(v, "0") != 0;
    }();
    return on;
}

}  // namespace

at::Tensor empty_weight(at::IntArrayRef sizes) {
    int64_t numel = 1;
    for (int64_t s : sizes) {
        TORCH_CHECK(s >= 0, "empty_weight: negative size in ", sizes);
        numel *= s;
    }
    const auto opts = at::TensorOptions().dtype(at::kByte);
    if (!huge_pages_requested() || size_t(numel) < kHugePage) return at::empty(sizes, opts);

    const size_t page = size_t(sysconf(_SC_PAGESIZE));
    const size_t bytes = round_up(size_t(numel), page);
    const size_t span = bytes + kHugePage;
    void* base = mmap(nullptr, span, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    TORCH_CHECK(base != MAP_FAILED, "empty_weight: cannot map ", numel, " bytes for a weight: ",
                std::strerror(errno));
    auto* b = static_cast<uint8_t*>(base);
    uint8_t* aligned = reinterpret_cast<uint8_t*>(round_up(reinterpret_cast<uintptr_t>(b), kHugePage));
    if (aligned > b) munmap(b, size_t(aligned - b));
    if (b + span > aligned + bytes) munmap(aligned + bytes, size_t(b + span - (aligned + bytes)));
    // Without THP (or with it set to "never") the advice fails or is ignored: 4 KiB pages.
    madvise(aligned, size_t(numel) / kHugePage * kHugePage, MADV_HUGEPAGE);
    return at::from_blob(
        aligned, sizes, [bytes](void* p) { munmap(p, bytes); }, opts);
}

}  // namespace tp_numa
