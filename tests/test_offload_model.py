"""The offload code path inside whole models, with device "cpu" standing in for the GPU.

- Synthetic all-F32 models (llama / qwen2 / qwen3 / gemma3 with a 4-token window): the
  matmuls are exact in float there, so the offloaded model must give the logits of the
  same model with its own CPU attention to float32 rounding (f16 cache: up to a flipped
  fp16 rounding of a cached element), and match the float64 reference forward of
  tests/synthetic_gguf.py.
- The shipped gemma3-270m on a real text longer than its 512-token window: same greedy
  continuation with and without offload. (Its matmuls quantize activations to 8-bit
  blocks, so a last-bit change in attention can flip a rounding step; logits are compared
  through the decisions, not to float32 rounding.)
- Applying placements and plans to a loaded model.
"""

import pytest
import torch

from mpi_util import mpirun_or_skip
from offload_util import F32, offload_worker_logits, rel_err, run
from synthetic_gguf import Spec, gemma3_spec, read_float_weights, reference_logits, write_model
from tp_numa import offload
from tp_numa.distributed.parallel_state import ParallelState
from tp_numa.layers.attention import Attention
from tp_numa.layers.device_attention import DeviceAttention
from tp_numa.models import load_model
from tp_numa.placement import PlacementError

HAS_CUDA = torch.cuda.is_available()
TOKENS = [5, 17, 3, 250, 42, 42, 7, 300, 1, 99, 128, 64, 11, 200]
SPECS = {
    "llama": lambda: Spec(arch="llama", **F32),
    "qwen2": lambda: Spec(arch="qwen2", **F32),
    "qwen3": lambda: Spec(arch="qwen3", **F32),
    "gemma3": lambda: gemma3_spec(**F32),
}


def cores(model):
    return [(n, m) for n, m in model.named_modules() if isinstance(m, Attention)]


@pytest.mark.parametrize("arch", list(SPECS))
@pytest.mark.parametrize("cache", ["f32", "f16"])
def test_offloaded_model_gives_the_same_logits(tmp_path, arch, cache):
    spec = SPECS[arch]()
    path = write_model(tmp_path / f"{arch}.gguf", spec)
    chunks = [6, 1, 1, 4, 1, 1]
    model, cfg = load_model(path, ParallelState())
    want = run(model, TOKENS, cache, chunks)
    moved = offload.offload_attention(model, {name: "cpu" for name, _ in cores(model)})
    assert len(moved) == cfg.n_layers and all(isinstance(m, DeviceAttention) for _, m in cores(model))
    got = run(model, TOKENS, cache, chunks)
    assert got.shape == want.shape == (len(TOKENS), spec.vocab)
    # f32 cache: float32 rounding only. f16 cache: the two attentions differ in the last
    # bits (~1e-6 here), and when that moves a later layer's k/v across an fp16 rounding
    # boundary, the cached value changes by one fp16 step (~5e-4 relative) on that element:
    # measured up to 1.4e-5 on these models
    assert rel_err(got, want) < (1e-5 if cache == "f32" else 1e-4)
    assert torch.equal(got.argmax(-1), want.argmax(-1))
    if cache == "f32":
        ref = reference_logits(spec, read_float_weights(path), TOKENS)
        assert rel_err(got, ref) < 2e-4


def test_all_cpu_placement_changes_nothing(tmp_path):
    model, _ = load_model(write_model(tmp_path / "m.gguf", SPECS["qwen2"]()), ParallelState())
    before = [type(m) for _, m in cores(model)]
    assert offload.apply_placement(model, offload.load_placement("all-cpu"), ParallelState()) == []
    assert [type(m) for _, m in cores(model)] == before == [Attention] * len(before)


def test_gpu_plan_on_a_host_without_that_gpu_is_refused(tmp_path):
    path = write_model(tmp_path / "m.gguf", SPECS["gemma3"]())
    model, _ = load_model(path, ParallelState())
    plan = offload.plan_for_file(path, offload.load_placement("attention-on-gpu", check=False), 1, n_gpus=1)
    assert plan.device_of("model.layers.0.self_attn.attn", 0) == "cuda:0"
    with pytest.raises(PlacementError, match=r"puts model\.layers\.\d+\.self_attn\.attn on cuda:0, but this host has 0"):
        offload.apply_placement(model, plan, ParallelState(), n_gpus=0)
    with pytest.raises(PlacementError, match="needs a CUDA GPU"):
        offload.apply_placement(model, offload.load_placement("attention-on-gpu", check=False), ParallelState(),
                                n_gpus=0)
    assert not any(isinstance(m, DeviceAttention) for _, m in cores(model))


def test_unknown_module_names_are_refused(tmp_path):
    model, _ = load_model(write_model(tmp_path / "m.gguf", SPECS["llama"]()), ParallelState())
    with pytest.raises(Exception, match=r"model\.layers\.99\.self_attn\.attn"):
        offload.offload_attention(model, {"model.layers.99.self_attn.attn": "cpu"})


@pytest.mark.mpi
@pytest.mark.parametrize("arch", ["qwen2", "gemma3"])
def test_offloaded_tp2_matches_single_rank(tmp_path, arch):
    """Every rank offloads its own heads' attention; tp=2 gives the tp=1 logits."""
    mpirun_or_skip()
    spec = SPECS[arch]()
    path = write_model(tmp_path / f"{arch}.gguf", spec)
    chunks = [6, 1, 1, 4, 1, 1]
    model, _ = load_model(path, ParallelState())
    want = run(model, TOKENS, "f32", chunks, ctx=len(TOKENS))
    got = offload_worker_logits(path, tmp_path / "logits.npy", TOKENS, chunks)
    assert rel_err(got, want) < 1e-4


TEXT = ("The history of the printing press begins in the fifteenth century, when Johannes Gutenberg "
        "combined movable metal type with an oil-based ink and a wooden press. Within decades, print "
        "shops had spread across Europe, and the cost of books fell sharply. ") * 12


def greedy(model, ids, n_gen, ctx):
    """Prefill ``ids`` in two chunks, then ``n_gen`` greedy tokens; (prefill logits, tokens)."""
    model.setup_cache(ctx, "f16")
    half = len(ids) // 2
    with torch.no_grad():
        logits = torch.cat([model(ids[:half], 0).float(), model(ids[half:], half).float()])
        out, pos, nxt = [], len(ids), int(logits[-1].argmax())
        for _ in range(n_gen):
            out.append(nxt)
            nxt = int(model(torch.tensor([nxt]), pos)[-1].argmax())
            pos += 1
    return logits, out


@pytest.mark.slow
def test_shipped_gemma3_same_greedy_continuation(gemma_path):
    from tp_numa.tokenizer import Tokenizer

    model, cfg = load_model(str(gemma_path), ParallelState())
    ids = torch.tensor(Tokenizer.from_gguf(gemma_path).encode(TEXT))
    assert len(ids) > cfg.sliding_window  # the window layers' CPU rings wrap
    ctx = len(ids) + 16
    want_logits, want = greedy(model, ids, 8, ctx)
    offload.offload_attention(model, {name: "cpu" for name, _ in cores(model)})
    got_logits, got = greedy(model, ids, 8, ctx)
    assert got == want
    assert (got_logits.argmax(-1) == want_logits.argmax(-1)).float().mean().item() >= 0.98


@pytest.mark.slow
@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
def test_shipped_gemma3_on_gpu_same_greedy_continuation(gemma_path):
    from tp_numa.tokenizer import Tokenizer

    model, cfg = load_model(str(gemma_path), ParallelState())
    ids = torch.tensor(Tokenizer.from_gguf(gemma_path).encode(TEXT))
    ctx = len(ids) + 16
    want_logits, want = greedy(model, ids, 8, ctx)
    moved = offload.apply_placement(model, offload.load_placement("attention-on-gpu"), ParallelState())
    assert len(moved) == cfg.n_layers
    got_logits, got = greedy(model, ids, 8, ctx)
    assert all(m.k_cache.device.type == "cuda" for _, m in cores(model))
    assert got == want
    assert (got_logits.argmax(-1) == want_logits.argmax(-1)).float().mean().item() >= 0.95


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("arch", list(SPECS))
def test_synthetic_on_gpu_matches_float_reference(tmp_path, arch):
    spec = SPECS[arch]()
    path = write_model(tmp_path / f"{arch}.gguf", spec)
    model, _ = load_model(path, ParallelState())
    offload.apply_placement(model, offload.load_placement("attention-on-gpu"), ParallelState())
    got = run(model, TOKENS, "f16", [6, 1, 1, 4, 1, 1])
    ref = reference_logits(spec, read_float_weights(path), TOKENS)
    assert rel_err(got, ref) < 2e-2
