"""Plan resolution on the shipped models at tp=1 and tp=2, from the GGUF header only.

Oracles: the per-rank weight bytes of the plan equal the bytes of the weights the model
loader actually holds for that rank (``models.weight_bytes``), and the KV-cache bytes
equal what ``setup_cache`` allocates; the header reader agrees with gguf.GGUFReader.
"""
import pytest

from tp_numa import offload
from tp_numa.config import ModelConfig
from tp_numa.gguf_loader import read_header
from tp_numa.placement import PlacementError, parse_placement

MODELS = ["qwen2.5-coder-0.5b", "gemma3-270m"]
# Model buffers that do not come from the file (rotary inverse frequencies, computed at
# build time): the only difference allowed between planned and loaded weight bytes.
COMPUTED_BUFFER_SLACK = 8192


@pytest.fixture(scope="module")
def headers(model_path):
    return {name: read_header(model_path(name)) for name in MODELS}


def plan(header, spec, tp, **kw):
    cfg = ModelConfig.from_gguf(header)
    kw.setdefault("n_gpus", 2)
    return offload.resolve_plan(cfg, offload.load_placement(spec, check=False), tp, tensors=header.tensors, **kw)


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("tp", [1, 2])
def test_attention_on_gpu_plan(headers, name, tp):
    h = headers[name]
    cfg = ModelConfig.from_gguf(h)
    p = plan(h, "attention-on-gpu", tp, max_seq_len=1024)
    assert p.tp_size == tp and not p.warnings
    attn = [e for e in p.entries if e.kind == "attention"]
    assert [e.module for e in attn] == [f"model.layers.{i}.self_attn.attn" for i in range(cfg.n_layers)]
    for e in p.entries:
        if e.kind == "attention":
            # rank r -> cuda:(r mod 2); the GPU cache holds every position
            assert e.devices == [f"cuda:{r % 2}" for r in range(tp)]
        else:
            assert e.devices == ["cpu"] * tp, e.module
    # every tensor of the file belongs to exactly one module
    owned = [t for e in p.entries for t in e.tensors if not (e.module == "lm_head" and cfg.tied_output)]
    assert sorted(owned) == sorted(h.tensors)
    # the weights split: every rank holds about 1/tp of the split tensors + replicated ones
    totals = p.totals()
    weights = [sum(e.nbytes[r] for e in p.entries if e.kind == "weights") for r in range(tp)]
    file_bytes = sum(t.n_bytes for t in h.tensors.values())
    if tp == 1:
        assert weights[0] == file_bytes
    else:
        assert sum(weights) < 1.02 * file_bytes and max(weights) < 0.55 * file_bytes
    for r in range(tp):
        assert totals[r]["cpu"] == weights[r]
        assert totals[r][f"cuda:{r % 2}"] == sum(e.nbytes[r] for e in attn)
    text = offload.format_plan(p)
    assert "model.layers.*.self_attn.attn  (KV cache)" in text and f"rank {tp - 1}:" in text


def test_kv_bytes_by_hand(headers):
    # qwen2.5-0.5B: 24 layers, 2 KV heads of 64; tp=2 -> one KV head per rank; f16
    p = plan(headers["qwen2.5-coder-0.5b"], "attention-on-gpu", 2, max_seq_len=1000, kv_type="f16")
    per_layer = 2 * 1000 * 1 * 64 * 2
    assert p.totals() == [{"cpu": p.totals()[0]["cpu"], "cuda:0": 24 * per_layer},
                          {"cpu": p.totals()[1]["cpu"], "cuda:1": 24 * per_layer}]
    # gemma3-270m: one KV head (replicated at tp=2) of 256; window 512 on 15 of 18 layers.
    # On the CPU a window layer keeps a ring of 512 slots; on the GPU every position.
    g = headers["gemma3-270m"]
    cpu = plan(g, "all-cpu", 2, max_seq_len=4096, kv_type="f32")
    gpu = plan(g, "attention-on-gpu", 2, max_seq_len=4096, kv_type="f32")
    row = 2 * 256 * 4
    cpu_kv = [sum(e.nbytes[r] for e in cpu.entries if e.kind == "attention") for r in range(2)]
    gpu_kv = [sum(e.nbytes[r] for e in gpu.entries if e.kind == "attention") for r in range(2)]
    assert cpu_kv == [row * (3 * 4096 + 15 * 512)] * 2
    assert gpu_kv == [row * 18 * 4096] * 2


@pytest.mark.slow
@pytest.mark.parametrize("name", MODELS)
def test_planned_bytes_equal_loaded_bytes(model_path, headers, name):
    """Build each rank's model of a tp=2 run in this process and compare with the plan."""
    from tp_numa.distributed.parallel_state import ParallelState
    from tp_numa.models import load_model, weight_bytes

    tp = 2
    p = plan(headers[name], "all-cpu", tp, max_seq_len=700)
    for r in range(tp):
        model, _ = load_model(str(model_path(name)), ParallelState(rank=r, world_size=tp, local_rank=r, local_size=tp))
        planned = sum(e.nbytes[r] for e in p.entries if e.kind == "weights")
        assert 0 <= weight_bytes(model) - planned <= COMPUTED_BUFFER_SLACK
        model.setup_cache(700, "f16")
        kv = sum(t.numel() * t.element_size() for _, m in model.named_modules()
                 for t in (getattr(m, "k_cache", None), getattr(m, "v_cache", None)) if t is not None)
        assert kv == sum(e.nbytes[r] for e in p.entries if e.kind == "attention")
        del model


def test_header_reader_agrees_with_gguf_reader(model_path):
    """The fast header reader gives the same tensor infos as the loader (gguf.GGUFReader)."""
    from tp_numa.gguf_loader import open_gguf

    path = model_path("gemma3-270m")
    h, f = read_header(path), open_gguf(path)
    assert h.tensors == f.tensors
    assert ModelConfig.from_gguf(h) == ModelConfig.from_gguf(f)


def test_unmatched_rule_warns(headers):
    p = parse_placement('[[rule]]\npattern = "attn$"\ndevice = "cpu"\n'
                        '[[rule]]\npattern = "^vision\\\\."\ndevice = "cuda"\n', "w.toml")
    cfg = ModelConfig.from_gguf(headers["gemma3-270m"])
    with pytest.warns(offload.PlacementWarning, match=r"w\.toml: rule 2 .* matches no module or tensor"):
        res = offload.resolve_plan(cfg, p, 1, tensors=headers["gemma3-270m"].tensors, n_gpus=1)
    assert len(res.warnings) == 1 and "warning: w.toml: rule 2" in offload.format_plan(res)


def test_tensor_name_rules_match_their_module(headers):
    # a rule written over GGUF tensor names selects the module owning the tensor
    p = parse_placement('[[rule]]\npattern = "^blk\\\\.1\\\\.attn_q\\\\.weight$"\ndevice = "cpu"\n', "t.toml")
    cfg = ModelConfig.from_gguf(headers["qwen2.5-coder-0.5b"])
    res = offload.resolve_plan(cfg, p, 1, tensors=headers["qwen2.5-coder-0.5b"].tensors, n_gpus=0)
    decided = [e.module for e in res.entries if e.rule is not None]
    assert decided == ["model.layers.1.self_attn.qkv_proj"]


def test_weights_on_gpu_without_their_layer_are_refused_by_name(headers):
    # a weight may move only with its whole layer (tests/test_offload_layers.py)
    p = parse_placement('[[rule]]\npattern = "blk\\\\.3\\\\.ffn_down"\ndevice = "cuda:0"\n', "w.toml")
    cfg = ModelConfig.from_gguf(headers["qwen2.5-coder-0.5b"])
    with pytest.raises(PlacementError, match=r"w\.toml: rule 1 .* places 'model\.layers\.3\.mlp\.down_proj' on "
                                             r"cuda:0, but .* a GPU takes whole decoder layers"):
        offload.resolve_plan(cfg, p, 1, tensors=headers["qwen2.5-coder-0.5b"].tensors, n_gpus=1)


def test_plan_without_gpus_for_gpu_config_fails(headers):
    with pytest.raises(PlacementError, match="needs a CUDA GPU"):
        plan(headers["gemma3-270m"], "attention-on-gpu", 1, n_gpus=0)


def test_ranks_on_two_hosts(headers):
    # 4 ranks, 2 per host, 2 GPUs per host: local ranks 0,1,0,1 -> cuda:0,1,0,1
    p = plan(headers["qwen2.5-coder-0.5b"], "attention-on-gpu", 4, local_ranks=[0, 1, 0, 1])
    assert p.device_of("model.layers.0.self_attn.attn", 2) == "cuda:0"
    assert p.device_of("model.layers.0.self_attn.attn", 3) == "cuda:1"


def test_shadowed_rule_warns(headers):
    p = parse_placement("[[rule]]\npattern = 'attn$'\ndevice = 'cpu'\n"
                        "[[rule]]\npattern = 'layers\\.0\\.self_attn\\.attn$'\ndevice = 'cuda'\n", "s.toml")
    cfg = ModelConfig.from_gguf(headers["gemma3-270m"])
    with pytest.warns(offload.PlacementWarning, match=r"rule 2 .* is never used: earlier rules take every module"):
        res = offload.resolve_plan(cfg, p, 1, tensors=headers["gemma3-270m"].tensors, n_gpus=1)
    assert all(d == "cpu" for e in res.entries for d in e.devices)
