// Collective algorithms over the per-rank double-buffered slots.
//
// Stamps. Collective number s (counted the same way on every rank) uses slot s % 2 of
// each rank and two stamp values: A(s) = 2s+1 ("my input for s is in my slot" / "I am in
// s") and B(s) = 2s+2 ("my reduced chunk of s is in my slot"). Stamps only grow.
//
// Slot reuse without a trailing barrier. Rank r writes slot s % 2 again at s+2. Peers
// may still read it for s until they enter s+1; a peer's stamp >= A(s+1) says exactly
// that. So before writing at s, r needs every peer's stamp >= A(s-1) = 2s-1. In a chain
// of all-reduces r has already seen that while waiting inside s-1 (peers_seen), so the
// check is free; after a broadcast it was the source of (which waits for nobody) it waits.
//
// All-reduce, small (one phase): copy input to my slot, publish A, wait for A of all,
// every rank sums all slots in rank order. Large (two phases, each rank reduces 1/L):
// publish A, rank r sums chunk r of every slot into its own slot, publish B, wait for B
// of all, copy every reduced chunk. Both give every rank bitwise the same result.
#include "comm/shm_collectives.h"

#include <algorithm>
#include <cstdlib>
#include <cstring>

namespace tp_numa::shm {
namespace {

inline uint64_t stamp_a(uint64_t s) { return 2 * s + 1; }
inline uint64_t stamp_b(uint64_t s) { return 2 * s + 2; }

void ensure_reusable(Group* g, uint64_t s, const char* what) {
    if (s >= 2 && g->peers_seen < 2 * s - 1) wait_all(g, 2 * s - 1, what);
}

void reduce_one_phase(Group* g, DType t, uint8_t* data, size_t n) {
    const uint64_t s = g->seq;
    const size_t bytes = n * dtype_size(t);
    ensure_reusable(g, s, "all_reduce");
    std::memcpy(g->slot(g->local_rank, s), data, bytes);
    publish(g, stamp_a(s));
    wait_all(g, stamp_a(s), "all_reduce");
    const void* srcs[64];
    for (int p = 0; p < g->local_size; ++p) srcs[p] = p == g->local_rank ? data : g->slot(p, s);
    reduce_sum(t, data, srcs, g->local_size, n);
    g->seq = s + 1;
}

void reduce_two_phase(Group* g, DType t, uint8_t* data, size_t n) {
    const uint64_t s = g->seq;
    const size_t es = dtype_size(t);
    const int L = g->local_size, me = g->local_rank;
    // chunk p = elements [lo(p), lo(p+1)), boundaries on 64-byte lines
    const size_t align = 64 / es;
    auto lo = [&](int p) {
        size_t x = (n * static_cast<size_t>(p) / L) / align * align;
        return p == L ? n : std::min(x, n);
    };
    ensure_reusable(g, s, "all_reduce");
    uint8_t* mine = g->slot(me, s);
    const size_t a = lo(me), b = lo(me + 1);
    // peers need every chunk of my input but mine (which I reduce straight from data)
    std::memcpy(mine, data, a * es);
    std::memcpy(mine + b * es, data + b * es, (n - b) * es);
    publish(g, stamp_a(s));
    wait_all(g, stamp_a(s), "all_reduce");
    const void* srcs[64];
    for (int p = 0; p < L; ++p) srcs[p] = (p == me ? data : g->slot(p, s)) + a * es;
    // my reduced chunk goes to my slot (for the peers) and to data in the same pass;
    // data's chunk is a source too, but each element is read before it is written
    reduce_sum(t, mine + a * es, srcs, L, b - a, data + a * es);
    publish(g, stamp_b(s));
    for (int k = 1; k < L; ++k) {
        const int p = (me + k) % L;  // start with the next rank: spreads the reads
        wait_peer(g, p, stamp_b(s), "all_reduce");
        const size_t pa = lo(p), pb = lo(p + 1);
        std::memcpy(data + pa * es, g->slot(p, s) + pa * es, (pb - pa) * es);
    }
    g->peers_seen = std::max(g->peers_seen, stamp_b(s));
    g->seq = s + 1;
}

}  // namespace

size_t two_phase_bytes() {
    static const size_t v = [] {
        const char* e = std::getenv("TP_NUMA_SHM_TWO_PHASE_BYTES");
        return e ? static_cast<size_t>(std::atoll(e)) : static_cast<size_t>(32 * 1024);
    }();
    return v;
}

void all_reduce(Group* g, DType t, void* data, size_t n) {
    check_usable(g);
    if (g->local_size == 1 || n == 0) return;
    const size_t es = dtype_size(t);
    const size_t piece = g->slot_bytes / es;
    auto* d = static_cast<uint8_t*>(data);
    for (size_t i = 0; i < n; i += piece) {
        const size_t m = std::min(piece, n - i);
        if (m * es >= two_phase_bytes())
            reduce_two_phase(g, t, d + i * es, m);
        else
            reduce_one_phase(g, t, d + i * es, m);
    }
}

void all_gather(Group* g, const void* in, const std::vector<size_t>& bytes, void* out, int root) {
    check_usable(g);
    const int L = g->local_size, me = g->local_rank;
    const bool receive = root < 0 || root == me;
    std::vector<size_t> displ(L + 1, 0);
    for (int p = 0; p < L; ++p) displ[p + 1] = displ[p] + bytes[p];
    const size_t most = *std::max_element(bytes.begin(), bytes.end());
    const size_t C = g->slot_bytes;
    const size_t pieces = most == 0 ? 1 : (most + C - 1) / C;
    const auto* src = static_cast<const uint8_t*>(in);
    auto* dst = static_cast<uint8_t*>(out);
    for (size_t k = 0; k < pieces; ++k) {
        const uint64_t s = g->seq;
        const size_t off = k * C;
        auto len = [&](int p) { return bytes[p] > off ? std::min(C, bytes[p] - off) : size_t(0); };
        ensure_reusable(g, s, "all_gather");
        if (L > 1) std::memcpy(g->slot(me, s), src + off, len(me));
        publish(g, stamp_a(s));
        if (receive) {
            std::memcpy(dst + displ[me] + off, src + off, len(me));
            for (int j = 1; j < L; ++j) {
                const int p = (me + j) % L;
                wait_peer(g, p, stamp_a(s), "all_gather");
                std::memcpy(dst + displ[p] + off, g->slot(p, s), len(p));
            }
            g->peers_seen = std::max(g->peers_seen, stamp_a(s));
        }
        g->seq = s + 1;
    }
}

void broadcast(Group* g, void* data, size_t bytes, int src) {
    check_usable(g);
    if (g->local_size == 1) return;
    const size_t C = g->slot_bytes;
    auto* d = static_cast<uint8_t*>(data);
    const size_t pieces = bytes == 0 ? 1 : (bytes + C - 1) / C;
    for (size_t k = 0; k < pieces; ++k) {
        const uint64_t s = g->seq;
        const size_t off = k * C, len = std::min(C, bytes - std::min(bytes, off));
        if (g->local_rank == src) {
            ensure_reusable(g, s, "broadcast");
            std::memcpy(g->slot(src, s), d + off, len);
            publish(g, stamp_a(s));
        } else {
            publish(g, stamp_a(s));  // "I am in s": done reading everything of s-1
            wait_peer(g, src, stamp_a(s), "broadcast");
            std::memcpy(d + off, g->slot(src, s), len);
        }
        g->seq = s + 1;
    }
}

}  // namespace tp_numa::shm
