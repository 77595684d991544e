"""Run under mpirun by tests/test_comm.py: the shm segments this rank maps are unlinked
already (nothing in /dev/shm) and were created with mode 0600 (seen through
/proc/self/map_files, which still reaches the deleted files). Prints "SEGMENTS-OK n" per rank."""
import os
import stat
import sys

import torch

from tp_numa.distributed import communicator as C
from tp_numa.distributed import parallel_state


def main() -> int:
    st = parallel_state.init()
    C.all_reduce(torch.ones(8))
    prefix = C._get().shm.prefix  # e.g. /tp_numa-1234-abcdef
    C.barrier()
    leftovers = [f for f in os.listdir("/dev/shm") if ("/" + f).startswith(prefix)]
    if leftovers:
        print(f"rank {st.rank}: segments still named in /dev/shm: {leftovers}", flush=True)
        return 1
    seen = 0
    with open("/proc/self/maps") as f:
        for line in f:
            if "/dev/shm" + prefix not in line:
                continue
            rng, path = line.split()[0], line.split(None, 5)[-1].strip()
            if not path.endswith("(deleted)"):
                print(f"rank {st.rank}: mapping not unlinked: {path}", flush=True)
                return 1
            mode = stat.S_IMODE(os.stat(f"/proc/self/map_files/{rng}").st_mode)
            if mode != 0o600:
                print(f"rank {st.rank}: segment {path} has mode {oct(mode)}", flush=True)
                return 1
            seen += 1
    if seen < st.local_size:
        print(f"rank {st.rank}: expected {st.local_size} mapped segments, found {seen}", flush=True)
        return 1
    print(f"SEGMENTS-OK {seen}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
