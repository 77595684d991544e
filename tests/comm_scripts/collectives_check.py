"""Run under mpirun by tests/test_comm.py: every collective against a plain oracle.

Each rank can regenerate every rank's input (seeded by rank and step), so the oracle is
computed locally: sum over ranks in fp32 (fp64 for float64) in rank order, rounded once
to the dtype (the documented result of all_reduce), concatenation for gathers, the source's tensor for
broadcasts. A random but rank-identical sequence of mixed collectives exercises the
double-buffered slots (slot reuse across op types, pieces larger than a slot, two-phase
sizes). Prints "OK <backend> <steps>" on rank 0 when everything matched.
"""
import random
import sys

import torch

from tp_numa.distributed import communicator as C
from tp_numa.distributed import parallel_state

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]


def data(rank: int, step: int, shape, dtype) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000003 * step + rank)
    return (torch.randn(shape, generator=g) * 4).to(dtype)


def main() -> int:
    st = parallel_state.init()
    r, n = st.rank, st.world_size
    steps = int(sys.argv[1]) if len(sys.argv) > 1 else 60
    rng = random.Random(1234)  # same sequence on every rank
    # the shm op sums in rank order on one host: exactly the oracle; MPI may reorder
    exact = C.backend_name() == "shm" or n == 2
    sizes = [1, 3, 64, 1000, 4099, 9000, 40000, 300000, 1_200_000]
    for step in range(steps):
        kind = rng.choice(["all_reduce", "all_reduce", "all_gather", "gather_to_main", "broadcast", "object"])
        dtype = rng.choice(DTYPES)
        numel = rng.choice(sizes)
        if kind == "all_reduce":
            shape = (numel,) if numel % 2 else (2, numel // 2)
            t = data(r, step, shape, dtype)
            C.all_reduce(t)
            acc_t = torch.float64 if dtype == torch.float64 else torch.float32
            acc = sum((data(p, step, shape, dtype).to(acc_t) for p in range(n)), torch.zeros(shape, dtype=acc_t))
            want = acc.to(dtype)
            if exact and not torch.equal(t, want):
                bad = (t.float() - want.float()).abs().max().item()
                print(f"rank {r} step {step}: all_reduce {dtype} {shape} differs by {bad}", flush=True)
                return 1
            if not exact:
                # MPI / hierarchical sum in another order: within one rounding of the dtype
                mag = sum((data(p, step, shape, dtype).float().abs() for p in range(n)), torch.zeros(shape))
                tol = 2 * torch.finfo(dtype).eps * mag + 2 * torch.finfo(torch.float32).eps * mag
                if ((t.float() - want.float()).abs() > tol).any():
                    print(f"rank {r} step {step}: all_reduce {dtype} {shape} outside rounding bound", flush=True)
                    return 1
            # every rank must hold bitwise the same result (replicated state stays equal)
            flat = t.reshape(1, -1)
            as_int = {torch.float32: torch.int32, torch.float64: torch.int64}.get(dtype, torch.int16)
            every = C.all_gather(flat.view(as_int), dim=0)
            if not bool((every == every[0:1]).all()):
                print(f"rank {r} step {step}: ranks disagree on the all_reduce result", flush=True)
                return 1
        elif kind in ("all_gather", "gather_to_main"):
            dim = rng.choice([0, 1, -1])
            widths = [max(0, numel // (4 * n) + rng.randint(-1, 2)) for _ in range(n)]
            if sum(widths) == 0:
                widths[0] = 1

            def piece(p):
                shape = [3, 3]
                shape[dim] = widths[p]
                return data(p, step, tuple(shape), dtype)

            fn = C.all_gather if kind == "all_gather" else C.gather_to_main
            out = fn(piece(r), dim)
            want = torch.cat([piece(p) for p in range(n)], dim=dim)
            if kind == "gather_to_main" and r != 0:
                if out is not None:
                    print(f"rank {r} step {step}: gather_to_main returned a tensor off rank 0", flush=True)
                    return 1
            elif not torch.equal(out, want):
                print(f"rank {r} step {step}: {kind} dim={dim} widths={widths} wrong", flush=True)
                return 1
        elif kind == "broadcast":
            src = rng.randrange(n)
            shape = (numel,)
            t = data(r, step, shape, dtype)
            C.broadcast(t, src=src)
            if not torch.equal(t, data(src, step, shape, dtype)):
                print(f"rank {r} step {step}: broadcast from {src} wrong", flush=True)
                return 1
        else:
            src = rng.randrange(n)
            got = C.broadcast_object({"from": r, "step": step}, src=src)
            if got != {"from": src, "step": step}:
                print(f"rank {r} step {step}: broadcast_object wrong: {got}", flush=True)
                return 1
    # non-contiguous input: all_reduce writes back into the strided view
    base = data(r, 99999, (8, 6), torch.float32)
    view = base[:, ::2]
    C.all_reduce(view)
    want = sum((data(p, 99999, (8, 6), torch.float32)[:, ::2] for p in range(n)), torch.zeros(8, 3))
    if not (torch.equal(view, want) if exact else torch.allclose(view, want, rtol=1e-6, atol=1e-5)):
        print(f"rank {r}: strided all_reduce wrong", flush=True)
        return 1
    if r == 0:
        print(f"OK {C.backend_name()} {steps}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
