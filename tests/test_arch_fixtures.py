"""Every supported architecture against llama.cpp on a tiny random fixture of its own making.

tests/data/arch_fixtures/NAME.gguf was written by llama.cpp's ``test-llama-archs`` (and
requantized by ``llama-quantize``), so its metadata keys and tensor names are exactly what
llama.cpp's saver produces for that architecture; NAME.npz holds llama.cpp's
teacher-forced log-probabilities over the full (128-token) vocabulary for fixed random
token ids, and its own batch-vs-one-token agreement. Made by scripts/make_arch_fixtures.py;
this test needs no llama.cpp.

For each fixture tp_numa (``tp_numa.models.load_model``, 1 rank) must reach, both in one
prefill of the whole sequence and one token at a time (the decode path):

- mean KL(llama.cpp || tp_numa) <= 0.02 nats;
- top-1 agreement >= llama.cpp's own one-token-vs-batch agreement (1.000 on most
  fixtures) minus 1 point: tp_numa rounds differently (summation order, an activation's
  Q8_0 rounding decided by its last bit), which changes up to ~0.5% of the choices here,
  while a wrong architecture detail costs several points (gemma3 without its sliding
  window: top-1 0.95, KL 0.02; llama with experts ignoring attn_output.bias: 0.92, 0.036).

An architecture where tp_numa is known to differ goes into KNOWN_GAPS with the reason
(both tests become xfail(strict=True)): when the gap is closed the tests pass, strict
xfail reports them as failures, and the entry must go. Each fixture loads in well under
a second; the decode test runs 384 one-token steps per fixture.
"""
from __future__ import annotations

import hashlib
import json
import os

import numpy as np
import pytest
import torch

from golden import kl_and_top1

FIXTURE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "arch_fixtures")
KL_MAX = 0.02
TOP1_SLACK = 0.01

# fixture name -> why tp_numa does not match llama.cpp on it yet (see the module docstring)
KNOWN_GAPS: dict[str, str] = {}


def _names() -> list[str]:
    if not os.path.isdir(FIXTURE_DIR):
        return []
    return sorted(f[:-4] for f in os.listdir(FIXTURE_DIR)
                  if f.endswith(".npz") and os.path.exists(os.path.join(FIXTURE_DIR, f[:-4] + ".gguf")))


def _params():
    return [pytest.param(n, marks=pytest.mark.xfail(strict=True, reason=KNOWN_GAPS[n])) if n in KNOWN_GAPS else n
            for n in _names()]


def load_fixture(name: str) -> dict:
    """{"gguf": path, "ids": int32 [S, T], "logprobs": float32 [S, T, V], "meta": dict}:
    S sequences of T token ids, each evaluated from position 0; logprobs[s, t] is
    llama.cpp's log_softmax (full vocabulary) for the token after ids[s, t]."""
    with np.load(os.path.join(FIXTURE_DIR, f"{name}.npz")) as z:
        return {"gguf": os.path.join(FIXTURE_DIR, f"{name}.gguf"), "ids": z["ids"],
                "logprobs": z["logprobs"], "meta": json.loads(str(z["meta"]))}


def test_fixtures_present():
    """The committed set covers at least the four dense architectures, and every .npz
    belongs to the .gguf beside it (sha256 recorded by scripts/make_arch_fixtures.py)."""
    names = _names()
    assert {"llama", "qwen2", "qwen3", "gemma3"} <= set(names), names
    for n in names:
        meta = load_fixture(n)["meta"]
        with open(os.path.join(FIXTURE_DIR, f"{n}.gguf"), "rb") as f:
            assert hashlib.sha256(f.read()).hexdigest() == meta["gguf_sha256"], f"{n}: .gguf and .npz do not match"


def _check(name: str, fx: dict, logits: torch.Tensor, path: str) -> None:
    lp = fx["logprobs"].reshape(-1, fx["logprobs"].shape[-1])    # (S*T, V), the order of `logits`
    order = np.argsort(-lp, axis=1, kind="stable")          # the full vocabulary, most probable first
    kl, top1 = kl_and_top1(order, np.take_along_axis(lp, order, axis=1), logits)
    floor = fx["meta"]["self_top1"] - TOP1_SLACK
    print(f"{name} {path}: mean KL {kl:.5f} nats, top-1 {top1:.3f} (llama.cpp's own {fx['meta']['self_top1']:.3f})")
    assert kl <= KL_MAX, f"{name} ({path}): mean KL {kl:.4f} nats > {KL_MAX}"
    assert top1 >= floor, f"{name} ({path}): top-1 agreement {top1:.3f} < {floor:.3f}"


@pytest.fixture(scope="module", params=_params())
def loaded(request):
    from tp_numa.models import load_model

    name = request.param
    fx = load_fixture(name)
    model, cfg = load_model(fx["gguf"])
    return name, fx, model, cfg


# float32 KV cache, as llama.cpp made the data (f16 there also rounds q and the attention
# weights to f16, which these random, sharp-attention models amplify; see the script)
KV_DTYPE = torch.float32


def test_prefill_matches_llama_cpp(loaded):
    """Each sequence in one forward from position 0."""
    name, fx, model, cfg = loaded
    out = []
    for seq in torch.tensor(fx["ids"], dtype=torch.long):
        model.setup_cache(len(seq), KV_DTYPE)
        out.append(model(seq, 0))
    _check(name, fx, torch.cat(out), "prefill")


def test_decode_matches_llama_cpp(loaded):
    """Each sequence one token at a time (the decode path, KV cache growing)."""
    name, fx, model, cfg = loaded
    out = []
    for seq in torch.tensor(fx["ids"], dtype=torch.long):
        model.setup_cache(len(seq), KV_DTYPE)
        out += [model(seq[i:i + 1], i) for i in range(len(seq))]
    _check(name, fx, torch.cat(out), "decode")
