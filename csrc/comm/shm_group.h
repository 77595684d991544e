// A shared-memory group: the ranks of one host, each owning one segment in /dev/shm that
// every other rank maps. Raw pointers and POSIX only; no torch.
//
// Segment of local rank p (created by p, mode 0600, first touched by p so its pages sit
// on p's NUMA node):
//   [Header, 4 KiB][slot 0: slot_bytes][slot 1: slot_bytes]
// Two slots (double buffering) let a rank start collective s+1 while slow peers still
// read its slot of collective s; no trailing barrier is needed (see shm_collectives.cpp).
//
// Synchronisation: each rank publishes a monotonically increasing stamp; a reader waits
// until the writer's stamp reaches the value of the phase it needs: spinning first, then
// sched_yield, then 50 us sleeps once it has waited 2 ms (a peer busy loading or
// tokenizing should not cost a whole core). While waiting it watches the host's abort
// word (a peer called fail()) and the waited-on peer's liveness (heartbeat written by a
// background thread every ~100 ms, and kill(pid, 0)), and throws std::runtime_error
// instead of spinning forever.
#pragma once
#include <atomic>
#include <cstddef>
#include <cstdint>
#include <string>
#include <thread>
#include <vector>

namespace tp_numa::shm {

struct alignas(64) Header {
    std::atomic<uint64_t> stamp;         // progress of this rank (see shm_collectives.cpp)
    char pad0[56];
    std::atomic<uint64_t> heartbeat_ns;  // CLOCK_MONOTONIC of the last sign of life
    std::atomic<int64_t> pid;
    char pad1[48];
    std::atomic<int64_t> abort_by;       // local rank 0's copy is the host's abort word:
    char pad2[56];                       // 0 = none, else (global rank + 1) of the first to fail
    uint64_t magic;
    uint64_t slot_bytes;
};
static_assert(sizeof(Header) == 256, "Header layout");
static_assert(std::atomic<uint64_t>::is_always_lock_free, "shared atomics must be lock-free");

constexpr size_t kHeaderBytes = 4096;
constexpr uint64_t kMagic = 0x746e756d61736d68ull;  // "hmsamunt"

struct Group {
    std::string prefix;              // segment names are prefix + ".<local rank>"
    int local_rank = 0;
    int local_size = 1;
    std::vector<int> ranks;          // global rank of each local rank (for messages)
    size_t slot_bytes = 0;
    double timeout_s = 5.0;
    long spin_iters = 2000;          // busy polls before the first sched_yield

    std::vector<uint8_t*> base;      // mapped segment of each local rank
    size_t seg_bytes = 0;
    bool unlinked = false;

    uint64_t seq = 0;                // collectives done by this rank (same on every rank)
    uint64_t peers_seen = 0;         // every peer's stamp is known to be >= this

    std::string broken;              // set after an error: the group cannot be used again

    std::atomic<bool> stop{false};
    std::thread heartbeat;

    Header* hdr(int p) const { return reinterpret_cast<Header*>(base[p]); }
    uint8_t* slot(int p, uint64_t s) const { return base[p] + kHeaderBytes + (s & 1) * slot_bytes; }
    std::string seg_name(int p) const { return prefix + "." + std::to_string(p); }
};

// Create this rank's segment (O_EXCL, 0600), touch it, start the heartbeat. Throws.
Group* create_group(const std::string& prefix, int local_rank, const std::vector<int>& ranks,
                    size_t slot_bytes, double timeout_s);
// Map the peers' segments (all peers must have created theirs). Throws.
void attach_group(Group* g);
// Remove this rank's segment name (after every peer has attached). Idempotent.
void unlink_group(Group* g);
// Stop the heartbeat, unmap, unlink if still needed. The pointer is freed.
void destroy_group(Group* g);

// Claim the host's abort word for global rank `rank`: true if this rank is the first.
bool signal_abort(Group* g, int rank);

// Publish this rank's stamp (release).
void publish(Group* g, uint64_t stamp);
// Wait until peer p's stamp >= value (acquire). `what` names the collective for errors.
void wait_peer(Group* g, int p, uint64_t value, const char* what);
// Wait for every peer; records peers_seen.
void wait_all(Group* g, uint64_t value, const char* what);
// Throws if the group is broken.
void check_usable(const Group* g);

uint64_t now_ns();

}  // namespace tp_numa::shm
