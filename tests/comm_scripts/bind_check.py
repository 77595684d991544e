"""Run under mpirun by tests/test_numa.py: setup_rank on every rank, print the result.
Checks that the affinity really is the planned CPU set and the threads follow it."""
import os
import sys

import torch

from tp_numa.distributed import numa, parallel_state


def main() -> int:
    st = parallel_state.init()
    b = numa.setup_rank(None)
    got = sorted(os.sched_getaffinity(0))
    if got != sorted(b.cpus) or torch.get_num_threads() != len(b.cpus):
        print(f"rank {st.rank}: affinity {got}, planned {b.cpus}, threads {torch.get_num_threads()}", flush=True)
        return 1
    print(f"RANK {st.rank} {b.describe()}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
