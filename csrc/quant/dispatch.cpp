// Run-time choice of the kernel variant: CPU feature detection, overridable with the
// environment variable TP_NUMA_KERNEL or set_kernel_isa() (tests force "scalar").
#include <atomic>
#include <cstdlib>
#include <string>

#include <c10/util/Exception.h>

#include "quant/kernels.h"
#include "quant/quant_ops.h"

namespace tp_numa {
namespace quant {
namespace {

bool cpu_has_avx2() {
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
           __builtin_cpu_supports("f16c");
}
bool cpu_has_avx512() {
    return cpu_has_avx2() && __builtin_cpu_supports("avx512f") &&
           __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl");
}
bool cpu_has_vnni() { return cpu_has_avx512() && __builtin_cpu_supports("avx512vnni"); }

// The variant for an ISA name; nullptr when it is not compiled in or the CPU lacks it.
const Kernels* lookup(const std::string& isa) {
    if (isa == "scalar") return &scalar_kernels();
    if (isa == "avx2") return cpu_has_avx2() ? avx2_kernels() : nullptr;
    if (isa == "avx512") return cpu_has_avx512() ? avx512_kernels() : nullptr;
    if (isa == "avx512vnni") return cpu_has_vnni() ? avx512vnni_kernels() : nullptr;
    return nullptr;
}

const Kernels* detect() {
    for (const char* isa : {"avx512vnni", "avx512", "avx2"}) {
        if (const Kernels* k = lookup(isa)) return k;
    }
    return &scalar_kernels();
}

const Kernels* resolve(const std::string& isa) {
    if (isa.empty() || isa == "auto") return detect();
    const Kernels* k = lookup(isa);
    TORCH_CHECK(k != nullptr, "tp_numa kernel ISA '", isa,
                "' is not available on this CPU/build (choose scalar, avx2, avx512, avx512vnni "
                "or auto)");
    return k;
}

const Kernels* initial() {
    const char* env = std::getenv("TP_NUMA_KERNEL");
    return resolve(env ? std::string(env) : std::string());
}

std::atomic<const Kernels*>& current() {
    static std::atomic<const Kernels*> k{initial()};
    return k;
}

}  // namespace

const Kernels& active_kernels() { return *current().load(std::memory_order_relaxed); }

}  // namespace quant

std::string kernel_isa() { return quant::active_kernels().isa; }

void set_kernel_isa(const std::string& isa) {
    quant::current().store(quant::resolve(isa), std::memory_order_relaxed);
}

}  // namespace tp_numa
