"""Hybrid MoE (preset experts-on-cpu): the dense part of MoE decoder layers on a device,
the routed experts on the CPU ranks (tp_numa/layers/device_layer.py DeviceMoE).

The CPU stands in for the GPU ("cpu" device): the same DeviceDecoderLayer code, fp16-stored
dense weights multiplied in float32. The test models store their dense matrices in F16
(exact in fp16) and the router in F32 (kept float32), so the hybrid path and the all-CPU
path differ by float summation order only; the routed experts are F32 and run through
the same CPU kernels either way.
- tp=1: experts-on-cpu logits (prefill chunks and decode) equal the all-CPU ones within 1e-4;
- tp=2 under mpirun: the same, every rank with its slice of every expert and of the
  shared expert, one all-reduce per MoE layer;
- the plan: routed experts on the CPU, the rest of the layers on the GPU, bytes per device
  and rank; a rule that puts routed experts on a GPU is one clear error.
"""
from __future__ import annotations

import pytest
import torch
from gguf import GGMLQuantizationType as QT

from offload_util import offload_worker_logits, rel_err, run
from synthetic_moe import moe_spec, write_moe_model
from tp_numa import offload
from tp_numa.distributed.parallel_state import ParallelState
from tp_numa.layers.device_layer import DeviceDecoderLayer, DeviceLinear, DeviceMoE, DeviceRMSNorm
from tp_numa.models import load_model
from tp_numa.placement import PlacementError, load_placement_spec, parse_placement

TOKENS = [5, 17, 42, 99, 3, 250, 61, 7, 123, 200, 8, 64, 31]
CHUNKS = [6, 1, 1, 4, 1]
F16_DENSE = dict(weight_type=QT.F16, embed_type=QT.F16, down_type=QT.F16, v_type=QT.F16)


def _model_file(tmp_path, arch: str):
    # F32 experts: no 8-bit activation quantization, which would turn the device path's
    # last-bit differences of the expert input into whole quantization steps
    ms = moe_spec(arch, gate_type=QT.F32, down_type=QT.F32)
    for k, v in F16_DENSE.items():
        setattr(ms.base, k, v)
    return write_moe_model(tmp_path / f"{arch}.gguf", ms)


@pytest.mark.parametrize("arch", ["qwen2moe", "qwen3moe"])
def test_experts_on_cpu_equals_all_cpu(tmp_path, arch):
    path = _model_file(tmp_path, arch)
    model, cfg = load_model(path, ParallelState())
    want = run(model, TOKENS, "f32", CHUNKS)
    model, cfg = load_model(path, ParallelState())
    experts = [layer.mlp.experts for layer in model.model.layers]
    offload.offload_layers(model, {i: "cpu" for i in range(cfg.n_layers)})
    got = run(model, TOKENS, "f32", CHUNKS)
    assert rel_err(got, want) < 1e-4
    for i, layer in enumerate(model.model.layers):
        assert isinstance(layer, DeviceDecoderLayer) and isinstance(layer.mlp, DeviceMoE)
        assert layer.mlp.routed.experts is experts[i]                   # the same quantized CPU slices
        assert layer.mlp.routed.experts.gate.dtype == torch.uint8      # raw GGUF rows, as loaded
        assert layer.mlp.routed.gate is None                            # router moved (1x RAM)
        assert layer.mlp.router.weight.dtype == torch.float32
        if arch == "qwen2moe":
            assert layer.mlp.shared_expert.gate_up_proj.weight.dtype == torch.float16
            assert not layer.mlp.shared_expert.down_proj.reduce         # rides in the layer's one reduce


@pytest.mark.mpi
def test_experts_on_cpu_tp2_equals_all_cpu(tmp_path):
    path = _model_file(tmp_path, "qwen2moe")
    model, cfg = load_model(path, ParallelState())
    want = run(model, TOKENS, "f32", CHUNKS, ctx=len(TOKENS))
    got = offload_worker_logits(path, tmp_path / "logits.npy", TOKENS, CHUNKS, layers=range(cfg.n_layers))
    assert rel_err(got, want) < 1e-4


def test_plan_keeps_routed_experts_on_the_cpu(tmp_path):
    path = _model_file(tmp_path, "qwen2moe")
    plan = offload.plan_for_file(path, load_placement_spec("experts-on-cpu"), 2, n_gpus=1)
    by_name = {e.module: e for e in plan.entries}
    assert by_name["model.layers.0.mlp.experts"].devices == ["cpu", "cpu"]
    for name in ("mlp.gate", "mlp.shared_expert.gate_up_proj", "self_attn.qkv_proj", "self_attn.attn"):
        assert by_name[f"model.layers.1.{name}"].devices == ["cuda:0", "cuda:0"], name
    totals = plan.totals()
    assert all(t["cpu"] > 0 and t["cuda:0"] > 0 for t in totals)
    text = offload.format_plan(plan)
    assert "model.layers.*.mlp.experts" in text and "rank 1" in text


def test_routed_experts_on_a_gpu_are_refused(tmp_path):
    path = _model_file(tmp_path, "qwen3moe")
    with pytest.raises(PlacementError, match=r"routed experts .* run on the CPU ranks only.*experts-on-cpu"):
        offload.plan_for_file(path, load_placement_spec("layers-on-gpu"), 1, n_gpus=1)


def test_rules_over_expert_tensor_names(tmp_path):
    """llama.cpp's -ot style: a rule on the GGUF names ffn_*_exps keeps them on the CPU."""
    path = _model_file(tmp_path, "qwen3moe")
    placement = parse_placement("[[rule]]\npattern = 'ffn_(gate|up|down|gate_up)_exps'\ndevice = 'cpu'\n"
                                "[[rule]]\npattern = '^model\\.layers\\.1\\.'\ndevice = 'cuda'\n", "test")
    plan = offload.plan_for_file(path, placement, 1, n_gpus=1)
    by_name = {e.module: e for e in plan.entries}
    assert by_name["model.layers.1.mlp.experts"].devices == ["cpu"]
    assert by_name["model.layers.1.mlp.gate"].devices == ["cuda:0"]
    assert by_name["model.layers.0.mlp.gate"].devices == ["cpu"]


@pytest.mark.parametrize("tp", [1, 2])
def test_planned_bytes_equal_the_hybrid_layer_buffers(tmp_path, tp):
    """Per rank: the plan's GPU bytes of a layer are the device buffers DeviceDecoderLayer
    allocates (fp16 dense, float32 router and vectors, KV cache), and its CPU bytes the
    routed experts' slices."""
    path = _model_file(tmp_path, "qwen2moe")
    plan = offload.plan_for_file(path, load_placement_spec("experts-on-cpu"), tp, n_gpus=1, max_seq_len=32)
    for r in range(tp):
        state = ParallelState(rank=r, world_size=tp, local_rank=r, local_size=tp)
        model, cfg = load_model(path, state)
        offload.offload_layers(model, {i: "cpu" for i in range(cfg.n_layers)})
        model.setup_cache(32, "f16")
        for i, layer in enumerate(model.model.layers):
            held = sum(t.numel() * t.element_size() for m in layer.modules()
                       if isinstance(m, (DeviceLinear, DeviceRMSNorm))
                       for t in (m.weight, getattr(m, "bias", None)) if t is not None)
            kv = layer.self_attn.attn.k_cache.nbytes + layer.self_attn.attn.v_cache.nbytes
            experts = layer.mlp.routed.experts
            routed = sum(getattr(experts, n).nbytes for n in ("gate", "up", "down"))
            entries = [e for e in plan.entries if e.layer == i]
            assert sum(e.nbytes[r] for e in entries if e.devices[r] != "cpu") == held + kv
            assert sum(e.nbytes[r] for e in entries if e.devices[r] == "cpu") == routed


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_experts_on_cpu_on_cuda(tmp_path):
    """On a GPU: fp16 GEMMs for the dense part (activations rounded to fp16), routed
    experts on the CPU; a looser bound than the float32 stand-in."""
    path = _model_file(tmp_path, "qwen2moe")
    model, cfg = load_model(path, ParallelState())
    want = run(model, TOKENS, "f16", CHUNKS)
    model, cfg = load_model(path, ParallelState())
    offload.offload_layers(model, {i: "cuda:0" for i in range(cfg.n_layers)})
    got = run(model, TOKENS, "f16", CHUNKS)
    layer = model.model.layers[0]
    assert layer.mlp.router.weight.device.type == "cuda" and layer.mlp.routed.experts.gate.device.type == "cpu"
    assert rel_err(got, want) < 1e-2
