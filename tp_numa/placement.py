"""Placement configs: ordered TOML rules that map module or tensor names to devices.

A config is a list of rules, tried in order; the first rule whose regular expression
matches (``re.search``, anywhere in the name) decides the device. Names that no rule
matches stay on the rank's CPU node::

    [[rule]]
    pattern = '\\.self_attn\\.attn$'     # the attention core and its KV cache
    device = "cuda"

Devices: ``"cpu"``, ``"cuda"`` (rank r uses ``cuda:(local_rank mod n_gpus)``) or
``"cuda:N"`` (that GPU, on every rank of the host). Named presets stand in for a file.
A GPU takes attention cores alone or whole decoder layers (``tp_numa.offload`` checks).

This module only parses and validates; ``tp_numa.offload`` resolves a config against a
model (plan) and applies it to a loaded model.
"""
from __future__ import annotations

import os
import re
import sys
from dataclasses import dataclass

from .errors import TpNumaError

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10: the same parser, as a package
    import tomli as tomllib


class PlacementError(TpNumaError):
    """A placement config that cannot be used (bad TOML, regex, device, or absent GPU)."""


PRESETS: dict[str, str] = {
    "all-cpu": """\
# Everything on the CPU ranks (the default without --offload).
""",
    "attention-on-gpu": """\
# Attention (scores, softmax, weighted sum) and the KV cache on the GPU; every weight,
# including the q/k/v and output projections, stays on the CPU ranks.
[[rule]]
pattern = '\\.self_attn\\.attn$'
device = "cuda"
""",
    "layers-on-gpu": """\
# Every decoder layer on the GPU (llama.cpp's -ngl 99): each rank's slice of the layer
# weights dequantized once to fp16 there, KV cache there too. The token embedding, the
# final norm and the LM head stay on the CPU ranks, quantized.
[[rule]]
pattern = '^model\\.layers\\.\\d+\\.'
device = "cuda"
""",
    "experts-on-cpu": """\
# Every decoder layer on the GPU except the routed experts of MoE layers (llama.cpp's
# -ngl 99 -ot exps=CPU, --cpu-moe): attention and its KV cache, norms, the router, the
# shared expert and dense FFNs dequantized once to fp16 on the GPU (router float32); the
# routed experts stay quantized on the CPU ranks, each rank a slice of every expert. The
# token embedding, the final norm and the LM head stay on the CPU ranks.
[[rule]]
pattern = '\\.mlp\\.experts$'
device = "cpu"

[[rule]]
pattern = '^model\\.layers\\.\\d+\\.'
device = "cuda"
""",
}

_DEVICE_RE = re.compile(r"^(cpu|cuda)(?::(\d+))?$")
_RULE_KEYS = {"pattern", "device"}
_TOP_KEYS = {"rule", "description"}


@dataclass(frozen=True)
class Device:
    """A device as written in a rule: ``cpu``, ``cuda`` (index chosen per rank) or ``cuda:N``."""

    kind: str                   # "cpu" | "cuda"
    index: int | None = None    # None: per-rank choice for cuda

    @property
    def is_gpu(self) -> bool:
        return self.kind == "cuda"

    def for_rank(self, local_rank: int, n_gpus: int) -> str:
        """The concrete device string for this rank: ``cuda`` -> ``cuda:(local_rank % n_gpus)``."""
        if self.kind == "cpu":
            return "cpu"
        if self.index is not None:
            return f"cuda:{self.index}"
        return f"cuda:{local_rank % max(n_gpus, 1)}"

    def __str__(self) -> str:
        return self.kind if self.index is None else f"{self.kind}:{self.index}"


def parse_device(text: object, where: str) -> Device:
    """``"cpu" | "cuda" | "cuda:N"`` (case-insensitive) -> Device; ``where`` names the rule."""
    if not isinstance(text, str):
        raise PlacementError(f"{where}: device must be a string such as \"cpu\", \"cuda\" or \"cuda:0\", "
                             f"got {text!r}")
    m = _DEVICE_RE.match(text.strip().lower())
    if m is None or (m.group(1) == "cpu" and m.group(2) is not None):
        raise PlacementError(f"{where}: unknown device {text!r} (use \"cpu\", \"cuda\" or \"cuda:N\")")
    return Device(m.group(1), None if m.group(2) is None else int(m.group(2)))


@dataclass(frozen=True)
class Rule:
    """One ``[[rule]]``: ``number`` is its 1-based position in the config."""

    number: int
    pattern: str
    regex: re.Pattern
    device: Device

    def matches(self, names: tuple[str, ...]) -> bool:
        return any(self.regex.search(n) for n in names)

    def describe(self) -> str:
        return f"rule {self.number} (pattern '{self.pattern}' -> {self.device})"


@dataclass(frozen=True)
class Placement:
    """A parsed config. ``source`` says where it came from (file path or preset name)."""

    source: str
    rules: tuple[Rule, ...]
    description: str = ""

    def rule_for(self, names: tuple[str, ...] | str) -> Rule | None:
        """First rule matching any of ``names`` (a module's name and its tensors' names)."""
        if isinstance(names, str):
            names = (names,)
        for rule in self.rules:
            if rule.matches(names):
                return rule
        return None

    def device_for(self, names: tuple[str, ...] | str) -> Device:
        rule = self.rule_for(names)
        return rule.device if rule is not None else Device("cpu")

    @property
    def gpu_rules(self) -> tuple[Rule, ...]:
        return tuple(r for r in self.rules if r.device.is_gpu)

    @property
    def uses_gpu(self) -> bool:
        return bool(self.gpu_rules)


def parse_placement(text: str, source: str) -> Placement:
    """Parse TOML text into a Placement; every error names ``source`` (and the rule)."""
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise PlacementError(f"{source}: invalid TOML: {e}") from None
    unknown = sorted(set(doc) - _TOP_KEYS)
    if unknown:
        raise PlacementError(f"{source}: unknown key(s) {', '.join(unknown)} "
                             "(a config holds [[rule]] tables and an optional description)")
    description = doc.get("description", "")
    if not isinstance(description, str):
        raise PlacementError(f"{source}: description must be a string")
    raw_rules = doc.get("rule", [])
    if not isinstance(raw_rules, list):
        raise PlacementError(f"{source}: 'rule' must be an array of tables: write [[rule]], not [rule]")
    rules = []
    for number, raw in enumerate(raw_rules, start=1):
        where = f"{source}: rule {number}"
        if not isinstance(raw, dict):
            raise PlacementError(f"{where}: must be a table with 'pattern' and 'device'")
        extra = sorted(set(raw) - _RULE_KEYS)
        if extra:
            raise PlacementError(f"{where}: unknown key(s) {', '.join(extra)} (a rule has 'pattern' and 'device')")
        missing = sorted(_RULE_KEYS - set(raw))
        if missing:
            raise PlacementError(f"{where}: missing {' and '.join(missing)}")
        pattern = raw["pattern"]
        if not isinstance(pattern, str) or not pattern:
            raise PlacementError(f"{where}: pattern must be a non-empty string (a regular expression)")
        try:
            regex = re.compile(pattern)
        except re.error as e:
            raise PlacementError(f"{where}: bad regular expression '{pattern}': {e}") from None
        rules.append(Rule(number, pattern, regex, parse_device(raw["device"], where)))
    return Placement(source, tuple(rules), description)


def load_placement_spec(spec: str | os.PathLike | None) -> Placement:
    """``--offload`` value -> Placement: a preset name, a TOML file, or None (all-cpu)."""
    if spec is None or spec == "":
        spec = "all-cpu"
    text_spec = os.fspath(spec)
    if text_spec in PRESETS:
        return parse_placement(PRESETS[text_spec], f"preset '{text_spec}'")
    if os.path.isfile(text_spec):
        try:
            with open(text_spec, "rb") as f:
                data = f.read()
        except OSError as e:
            raise PlacementError(f"offload config {text_spec}: cannot read ({e.strerror})") from None
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            raise PlacementError(f"{text_spec}: invalid TOML: not UTF-8 text") from None
        return parse_placement(text, text_spec)
    if os.path.exists(text_spec):
        raise PlacementError(f"offload config {text_spec} is not a file")
    raise PlacementError(f"--offload {text_spec!r}: no such file and no such preset "
                         f"(presets: {', '.join(PRESETS)})")
