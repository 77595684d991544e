// Thin ATen wrappers over the torch-free shm collectives: check dtypes/shapes, find the
// group by handle, pass raw pointers.
#include "comm/shm_ops.h"

#include <array>
#include <mutex>

#include "comm/shm_collectives.h"
#include "comm/shm_group.h"

namespace tp_numa {
namespace {

constexpr int kMaxGroups = 16;
std::array<shm::Group*, kMaxGroups> g_groups{};
std::mutex g_groups_mutex;  // create/destroy only; the hot path reads a stable slot

shm::Group* group(int64_t handle) {
    TORCH_CHECK(handle >= 0 && handle < kMaxGroups && g_groups[handle] != nullptr,
                "tp_numa shm: no group with handle ", handle);
    return g_groups[handle];
}

shm::DType dtype_of(const at::Tensor& t) {
    switch (t.scalar_type()) {
        case at::kFloat: return shm::DType::F32;
        case at::kBFloat16: return shm::DType::BF16;
        case at::kHalf: return shm::DType::F16;
        case at::kDouble: return shm::DType::F64;
        default: TORCH_CHECK(false, "tp_numa shm all_reduce: dtype ", t.scalar_type(), " (expected float32, bfloat16, float16 or float64)");
    }
}

void check_cpu_contiguous(const at::Tensor& t, const char* what) {
    TORCH_CHECK(t.device().is_cpu(), "tp_numa shm ", what, ": tensor must be on CPU, got ", t.device());
    TORCH_CHECK(t.is_contiguous(), "tp_numa shm ", what, ": tensor must be contiguous");
}

}  // namespace

int64_t shm_create(const std::string& prefix, int64_t local_rank, c10::IntArrayRef ranks, int64_t slot_bytes,
                   double timeout_s) {
    TORCH_CHECK(!ranks.empty() && ranks.size() <= 64, "tp_numa shm: 1..64 ranks per host, got ", ranks.size());
    TORCH_CHECK(!prefix.empty() && prefix[0] == '/' && prefix.find('/', 1) == std::string::npos,
                "tp_numa shm: segment prefix must look like /name, got ", prefix);
    std::vector<int> r(ranks.begin(), ranks.end());
    std::lock_guard<std::mutex> lock(g_groups_mutex);
    for (int h = 0; h < kMaxGroups; ++h) {
        if (g_groups[h] == nullptr) {
            g_groups[h] = shm::create_group(prefix, static_cast<int>(local_rank), r, static_cast<size_t>(slot_bytes),
                                            timeout_s);
            return h;
        }
    }
    TORCH_CHECK(false, "tp_numa shm: too many groups (", kMaxGroups, ")");
}

void shm_attach(int64_t handle) { shm::attach_group(group(handle)); }

void shm_unlink(int64_t handle) { shm::unlink_group(group(handle)); }

void shm_destroy(int64_t handle) {
    std::lock_guard<std::mutex> lock(g_groups_mutex);
    shm::destroy_group(group(handle));
    g_groups[handle] = nullptr;
}

bool shm_signal_abort(int64_t handle, int64_t rank) { return shm::signal_abort(group(handle), static_cast<int>(rank)); }

void shm_all_reduce(const at::Tensor& t, int64_t handle) {
    check_cpu_contiguous(t, "all_reduce");
    shm::all_reduce(group(handle), dtype_of(t), t.data_ptr(), static_cast<size_t>(t.numel()));
}

void shm_all_gather(const at::Tensor& t, const at::Tensor& out, int64_t handle, c10::IntArrayRef sizes,
                    int64_t root) {
    shm::Group* g = group(handle);
    check_cpu_contiguous(t, "all_gather");
    TORCH_CHECK(static_cast<int>(sizes.size()) == g->local_size, "tp_numa shm all_gather: ", sizes.size(),
                " sizes for ", g->local_size, " ranks");
    TORCH_CHECK(t.dim() >= 1 && t.size(0) == sizes[g->local_rank], "tp_numa shm all_gather: this rank has ",
                t.dim() ? t.size(0) : 0, " rows, sizes say ", sizes[g->local_rank]);
    const int64_t row_bytes = t.size(0) ? t.nbytes() / t.size(0) : 0;
    std::vector<size_t> bytes;
    int64_t total = 0;
    for (int64_t s : sizes) {
        TORCH_CHECK(s >= 0, "tp_numa shm all_gather: negative size");
        total += s;
    }
    const bool receive = root < 0 || root == g->local_rank;
    int64_t rb = row_bytes;
    if (receive) {
        check_cpu_contiguous(out, "all_gather (out)");
        TORCH_CHECK(out.scalar_type() == t.scalar_type() && out.dim() == t.dim() && out.size(0) == total,
                    "tp_numa shm all_gather: out must be (", total, ", ...) of ", t.scalar_type());
        for (int64_t d = 1; d < t.dim(); ++d)
            TORCH_CHECK(out.size(d) == t.size(d), "tp_numa shm all_gather: out shape mismatch in dim ", d);
        rb = total ? out.nbytes() / total : 0;
    }
    for (int64_t s : sizes) bytes.push_back(static_cast<size_t>(s * rb));
    shm::all_gather(g, t.data_ptr(), bytes, receive ? out.data_ptr() : nullptr, static_cast<int>(root));
}

void shm_broadcast(const at::Tensor& t, int64_t handle, int64_t src) {
    shm::Group* g = group(handle);
    check_cpu_contiguous(t, "broadcast");
    TORCH_CHECK(src >= 0 && src < g->local_size, "tp_numa shm broadcast: src ", src, " not in group of ",
                g->local_size);
    shm::broadcast(g, t.data_ptr(), t.nbytes(), static_cast<int>(src));
}

}  // namespace tp_numa
