"""Placement configs: TOML parsing, validation, first-match rules, per-rank GPU mapping,
and the no-CUDA check that runs before any weight is loaded."""
import re

import pytest
import torch

from tp_numa import offload
from tp_numa.errors import TpNumaError
from tp_numa.placement import PRESETS, Device, PlacementError, load_placement_spec, parse_placement

HAS_CUDA = torch.cuda.is_available()


def write(tmp_path, text, name="p.toml"):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_rules_in_order_first_match_wins():
    p = parse_placement("""
description = "two rules"
[[rule]]
pattern = 'layers\\.0\\.self_attn\\.attn$'
device = "cpu"
[[rule]]
pattern = '\\.self_attn\\.attn$'
device = "cuda:1"
""", "t.toml")
    assert p.description == "two rules"
    assert [r.number for r in p.rules] == [1, 2]
    assert p.device_for("model.layers.0.self_attn.attn") == Device("cpu")
    assert p.device_for("model.layers.10.self_attn.attn") == Device("cuda", 1)
    # no rule matches: the rank's CPU
    assert p.device_for("model.layers.3.mlp.down_proj") == Device("cpu")
    # a module also matches through the names of its tensors
    assert p.rule_for(("model.layers.3.self_attn.qkv_proj", "blk.3.attn_q.weight")) is None
    assert p.uses_gpu and [r.number for r in p.gpu_rules] == [2]


@pytest.mark.parametrize("text,device", [
    ("cpu", Device("cpu")), ("CUDA", Device("cuda")), ("cuda:0", Device("cuda", 0)), ("cuda:3", Device("cuda", 3)),
])
def test_device_strings(text, device):
    p = parse_placement(f'[[rule]]\npattern = "x"\ndevice = "{text}"\n', "t.toml")
    assert p.rules[0].device == device


@pytest.mark.parametrize("text", ["gpu", "cuda0", "cuda:", "cuda:-1", "cpu:0", "CUDA:x", "metal"])
def test_unknown_device_is_an_error_naming_file_and_rule(text):
    with pytest.raises(PlacementError, match=r"t\.toml: rule 1: unknown device"):
        parse_placement(f'[[rule]]\npattern = "x"\ndevice = "{text}"\n', "t.toml")


def test_device_must_be_a_string():
    with pytest.raises(PlacementError, match="rule 1: device must be a string"):
        parse_placement('[[rule]]\npattern = "x"\ndevice = 0\n', "t.toml")


def test_bad_toml_names_the_file(tmp_path):
    path = write(tmp_path, '[[rule]]\npattern = "unterminated\n')
    with pytest.raises(PlacementError, match=re.escape(path) + ": invalid TOML"):
        load_placement_spec(path)


def test_bad_regex_names_rule_and_pattern():
    with pytest.raises(PlacementError, match=r"rule 2: bad regular expression 'attn\(': "):
        parse_placement('[[rule]]\npattern = "ok"\ndevice = "cpu"\n'
                        '[[rule]]\npattern = "attn("\ndevice = "cuda"\n', "t.toml")


@pytest.mark.parametrize("text,message", [
    ('[[rule]]\ndevice = "cpu"\n', "rule 1: missing pattern"),
    ('[[rule]]\npattern = "x"\n', "rule 1: missing device"),
    ('[[rule]]\npattern = "x"\ndevice = "cpu"\nregex = "y"\n', "rule 1: unknown key"),
    ('[[rule]]\npattern = ""\ndevice = "cpu"\n', "pattern must be a non-empty string"),
    ('[rule]\npattern = "x"\ndevice = "cpu"\n', r"write \[\[rule\]\]"),
    ('[[rules]]\npattern = "x"\ndevice = "cpu"\n', "unknown key"),
])
def test_structural_mistakes(text, message):
    with pytest.raises(PlacementError, match=message):
        parse_placement(text, "t.toml")


def test_presets_and_specs(tmp_path):
    assert set(PRESETS) == {"all-cpu", "attention-on-gpu", "layers-on-gpu", "experts-on-cpu"}
    hybrid = load_placement_spec("experts-on-cpu")
    assert hybrid.device_for("model.layers.5.mlp.experts") == Device("cpu")
    for name in ("model.layers.5.mlp.gate", "model.layers.5.mlp.shared_expert.down_proj", "model.layers.0.self_attn.attn"):
        assert hybrid.device_for(name) == Device("cuda")
    assert not load_placement_spec(None).uses_gpu
    assert not load_placement_spec("all-cpu").uses_gpu
    gpu = load_placement_spec("attention-on-gpu")
    assert gpu.device_for("model.layers.7.self_attn.attn") == Device("cuda")
    assert gpu.device_for("model.layers.7.self_attn.o_proj") == Device("cpu")
    assert gpu.device_for("model.layers.7.self_attn.qkv_proj") == Device("cpu")
    layers = load_placement_spec("layers-on-gpu")
    for name in ("model.layers.0.input_layernorm", "model.layers.17.self_attn.attn", "model.layers.3.mlp.down_proj"):
        assert layers.device_for(name) == Device("cuda")
    for name in ("model.embed_tokens", "model.norm", "lm_head", "token_embd.weight", "blk.3.ffn_down.weight"):
        assert layers.device_for(name) == Device("cpu")
    path = write(tmp_path, '[[rule]]\npattern = "attn$"\ndevice = "cpu"\n')
    assert load_placement_spec(path).source == path
    with pytest.raises(PlacementError, match="no such file and no such preset"):
        load_placement_spec("attention-on-tpu")
    with pytest.raises(PlacementError, match="is not a file"):
        load_placement_spec(str(tmp_path))


def test_placement_error_is_a_user_error():
    assert issubclass(PlacementError, TpNumaError)


def test_rank_to_gpu_mapping():
    # rank r uses cuda:(local_rank mod n_gpus) unless the config names the index
    assert [Device("cuda").for_rank(r, 2) for r in range(4)] == ["cuda:0", "cuda:1", "cuda:0", "cuda:1"]
    assert [Device("cuda", 1).for_rank(r, 2) for r in range(3)] == ["cuda:1"] * 3
    assert Device("cpu").for_rank(5, 2) == "cpu"


def test_gpu_config_without_cuda_fails_before_loading():
    """check_devices is what load_placement runs before any weight is read."""
    with pytest.raises(PlacementError, match=r"preset 'attention-on-gpu': rule 1 .* needs a CUDA GPU"):
        offload.load_placement("attention-on-gpu", n_gpus=0)
    # all-cpu never needs one, and planning for another machine skips the check
    offload.load_placement("all-cpu", n_gpus=0)
    offload.load_placement("attention-on-gpu", check=False, n_gpus=0)


def test_gpu_index_beyond_the_host():
    p = parse_placement('[[rule]]\npattern = "attn$"\ndevice = "cuda:2"\n', "t.toml")
    with pytest.raises(PlacementError, match=r"names GPU 2, but this host has 2"):
        offload.check_devices(p, n_gpus=2)
    offload.check_devices(p, n_gpus=3)


@pytest.mark.skipif(HAS_CUDA, reason="this machine has CUDA")
def test_load_placement_checks_this_host_without_cuda():
    assert offload.cuda_device_count() == 0
    with pytest.raises(PlacementError, match="needs a CUDA GPU, but none is available"):
        offload.load_placement("attention-on-gpu")
