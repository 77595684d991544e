// Segments, heartbeat and waiting of a shared-memory group (see shm_group.h).
#include "comm/shm_group.h"

#include <fcntl.h>
#include <sched.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <stdexcept>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define TP_NUMA_CPU_RELAX() _mm_pause()
#else
#define TP_NUMA_CPU_RELAX() __asm__ __volatile__("" ::: "memory")
#endif

namespace tp_numa::shm {

uint64_t now_ns() {
    timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return static_cast<uint64_t>(ts.tv_sec) * 1000000000ull + static_cast<uint64_t>(ts.tv_nsec);
}

namespace {

[[noreturn]] void sys_fail(const std::string& what, const std::string& name) {
    throw std::runtime_error("tp_numa shm: " + what + " " + name + ": " + std::strerror(errno));
}

void heartbeat_loop(Group* g) {
    // a beat every timeout/20 (at most 100 ms) so a live peer is never mistaken for dead
    uint64_t period_ns = static_cast<uint64_t>(g->timeout_s * 1e9 / 20.0);
    if (period_ns > 100000000ull) period_ns = 100000000ull;
    if (period_ns < 1000000ull) period_ns = 1000000ull;
    Header* h = g->hdr(g->local_rank);
    while (!g->stop.load(std::memory_order_relaxed)) {
        h->heartbeat_ns.store(now_ns(), std::memory_order_relaxed);
        timespec ts{static_cast<time_t>(period_ns / 1000000000ull), static_cast<long>(period_ns % 1000000000ull)};
        nanosleep(&ts, nullptr);
    }
}

[[noreturn]] void break_group(Group* g, const std::string& msg) {
    g->broken = msg;
    throw std::runtime_error(msg);
}

// Called from the slow part of a wait: a peer's failure or death ends the wait.
void check_peer(Group* g, int p, const char* what, uint64_t waited_since) {
    const int64_t by = g->hdr(0)->abort_by.load(std::memory_order_acquire);
    const int me = g->ranks[g->local_rank];
    if (by != 0 && by != me + 1) {
        break_group(g, "tp_numa shm: rank " + std::to_string(by - 1) + " failed; rank " +
                           std::to_string(me) + " stops waiting in " + what);
    }
    Header* h = g->hdr(p);
    const int64_t pid = h->pid.load(std::memory_order_relaxed);
    const uint64_t now = now_ns();
    const uint64_t beat = h->heartbeat_ns.load(std::memory_order_relaxed);
    // the heartbeat is only trusted as "dead" after we ourselves waited that long, so a
    // stall of this process (swapped out, stopped) is not blamed on the peer
    const double silent_s = now > beat ? (now - beat) * 1e-9 : 0.0;
    const double waited_s = (now - waited_since) * 1e-9;
    // a vanished pid ends the wait early, once the heartbeat is stale as well (a peer in
    // another pid namespace would look vanished while its heartbeat keeps going)
    const double stale_s = g->timeout_s / 2 < 0.5 ? g->timeout_s / 2 : 0.5;
    const bool gone =
        silent_s > stale_s && pid > 0 && kill(static_cast<pid_t>(pid), 0) != 0 && errno == ESRCH;
    if (gone || (silent_s > g->timeout_s && waited_s > g->timeout_s)) {
        char buf[320];
        std::snprintf(buf, sizeof buf,
                      "tp_numa shm: rank %d (pid %lld) %s while rank %d waited in %s "
                      "(TP_NUMA_COMM_TIMEOUT=%.1fs)",
                      g->ranks[p], static_cast<long long>(pid),
                      gone ? "has exited" : "has stopped responding", me, what, g->timeout_s);
        break_group(g, buf);
    }
}

}  // namespace

void check_usable(const Group* g) {
    if (!g->broken.empty())
        throw std::runtime_error("tp_numa shm: group unusable after an earlier error: " + g->broken);
}

Group* create_group(const std::string& prefix, int local_rank, const std::vector<int>& ranks,
                    size_t slot_bytes, double timeout_s) {
    if (ranks.empty() || local_rank < 0 || local_rank >= static_cast<int>(ranks.size()))
        throw std::runtime_error("tp_numa shm: bad local rank / group size");
    if (slot_bytes < 4096 || slot_bytes % 4096 != 0)
        throw std::runtime_error("tp_numa shm: slot size must be a positive multiple of 4096 bytes");
    auto* g = new Group();
    g->prefix = prefix;
    g->local_rank = local_rank;
    g->local_size = static_cast<int>(ranks.size());
    g->ranks = ranks;
    g->slot_bytes = slot_bytes;
    g->timeout_s = timeout_s > 0 ? timeout_s : 5.0;
    if (const char* s = std::getenv("TP_NUMA_SHM_SPIN")) g->spin_iters = std::atol(s);
    g->seg_bytes = kHeaderBytes + 2 * slot_bytes;
    g->base.assign(g->local_size, nullptr);

    const std::string name = g->seg_name(local_rank);
    int fd = shm_open(name.c_str(), O_CREAT | O_EXCL | O_RDWR, 0600);
    if (fd < 0) {
        delete g;
        sys_fail("cannot create", name);
    }
    // umask can only remove bits, but make 0600 explicit whatever the umask
    if (fchmod(fd, 0600) != 0 || ftruncate(fd, static_cast<off_t>(g->seg_bytes)) != 0) {
        close(fd);
        shm_unlink(name.c_str());
        delete g;
        sys_fail("cannot size", name);
    }
    void* p = mmap(nullptr, g->seg_bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    close(fd);
    if (p == MAP_FAILED) {
        shm_unlink(name.c_str());
        delete g;
        sys_fail("cannot map", name);
    }
    // first touch by the owner: the pages land on this rank's NUMA node (its mempolicy)
    std::memset(p, 0, g->seg_bytes);
    g->base[local_rank] = static_cast<uint8_t*>(p);
    Header* h = g->hdr(local_rank);
    h->magic = kMagic;
    h->slot_bytes = slot_bytes;
    h->pid.store(getpid(), std::memory_order_relaxed);
    h->heartbeat_ns.store(now_ns(), std::memory_order_relaxed);
    h->stamp.store(0, std::memory_order_release);
    g->heartbeat = std::thread(heartbeat_loop, g);
    return g;
}

void attach_group(Group* g) {
    for (int p = 0; p < g->local_size; ++p) {
        if (p == g->local_rank || g->base[p]) continue;
        const std::string name = g->seg_name(p);
        int fd = shm_open(name.c_str(), O_RDWR, 0);
        if (fd < 0) sys_fail("cannot open peer segment", name);
        void* m = mmap(nullptr, g->seg_bytes, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, fd, 0);
        close(fd);
        if (m == MAP_FAILED) sys_fail("cannot map peer segment", name);
        g->base[p] = static_cast<uint8_t*>(m);
        const Header* h = g->hdr(p);
        if (h->magic != kMagic || h->slot_bytes != g->slot_bytes)
            throw std::runtime_error("tp_numa shm: peer segment " + name + " has another layout");
    }
}

void unlink_group(Group* g) {
    if (g->unlinked) return;
    shm_unlink(g->seg_name(g->local_rank).c_str());
    g->unlinked = true;
}

void destroy_group(Group* g) {
    g->stop.store(true);
    if (g->heartbeat.joinable()) g->heartbeat.join();
    unlink_group(g);
    for (uint8_t* b : g->base)
        if (b) munmap(b, g->seg_bytes);
    delete g;
}

bool signal_abort(Group* g, int rank) {
    int64_t expected = 0;
    Header* h0 = g->base[0] ? g->hdr(0) : nullptr;
    if (!h0) return true;
    if (h0->abort_by.compare_exchange_strong(expected, rank + 1, std::memory_order_acq_rel)) return true;
    return expected == rank + 1;
}

void publish(Group* g, uint64_t stamp) { g->hdr(g->local_rank)->stamp.store(stamp, std::memory_order_release); }

void wait_peer(Group* g, int p, uint64_t value, const char* what) {
    const std::atomic<uint64_t>& st = g->hdr(p)->stamp;
    if (st.load(std::memory_order_acquire) >= value) return;
    for (long i = 0; i < g->spin_iters; ++i) {
        TP_NUMA_CPU_RELAX();
        if (st.load(std::memory_order_acquire) >= value) return;
    }
    const uint64_t since = now_ns();
    bool doze = false;  // after a long wait (a peer loading, tokenizing): sleep, do not burn a core
    for (uint64_t n = 1;; ++n) {
        if (doze) {
            timespec ts{0, 50000};
            nanosleep(&ts, nullptr);
        } else {
            sched_yield();
        }
        if (st.load(std::memory_order_acquire) >= value) return;
        if ((n & 63) == 0) {
            check_peer(g, p, what, since);
            doze = now_ns() - since > 2000000ull;  // 2 ms
        }
    }
}

void wait_all(Group* g, uint64_t value, const char* what) {
    for (int p = 0; p < g->local_size; ++p)
        if (p != g->local_rank) wait_peer(g, p, value, what);
    if (value > g->peers_seen) g->peers_seen = value;
}

}  // namespace tp_numa::shm
