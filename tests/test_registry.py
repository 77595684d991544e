"""Model registry: paths pass through, short names become verified cached GGUF files."""
import os
from pathlib import Path

import pytest

from tp_numa import model_registry
from tp_numa.errors import ModelFormatError, TpNumaError


def test_existing_path_is_returned_as_is(tmp_path):
    f = tmp_path / "m.gguf"
    f.write_bytes(b"GGUF")
    assert model_registry.resolve(str(f)) == f
    assert model_registry.resolve(f) == f


def test_missing_path_names_the_file(tmp_path):
    missing = tmp_path / "nope.gguf"
    with pytest.raises(ModelFormatError, match="nope.gguf"):
        model_registry.resolve(str(missing))
    with pytest.raises(ModelFormatError, match="does not exist"):
        model_registry.resolve("no_such_model.gguf")


def test_unknown_name_lists_the_known_names():
    with pytest.raises(TpNumaError) as e:
        model_registry.resolve("llama-9000")
    msg = str(e.value)
    assert "llama-9000" in msg
    for name in model_registry.known_names():
        assert name in msg


def test_cache_dir_follows_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("TP_NUMA_CACHE", str(tmp_path / "c"))
    assert model_registry.cache_dir() == tmp_path / "c"
    monkeypatch.delenv("TP_NUMA_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert model_registry.cache_dir() == tmp_path / "x" / "tp_numa"


@pytest.mark.slow
@pytest.mark.parametrize("name", ["qwen2.5-coder-0.5b", "gemma3-270m"])
def test_short_name_gives_verified_gguf(model_path, name):
    path = model_path(name)
    spec = model_registry.MODELS[name]
    assert path.name == spec.filename
    assert path.stat().st_size == spec.size
    with open(path, "rb") as f:
        assert f.read(4) == b"GGUF"
    assert model_registry._is_verified(spec, path)
    # reuse: the same file, no work
    assert model_registry.resolve(name) == path


@pytest.mark.slow
def test_join_from_installed_packages_into_a_fresh_cache(gemma_path, monkeypatch, tmp_path, capfd):
    """Joining is atomic and verified: a fresh cache gets the same bytes, no temp files."""
    monkeypatch.setenv("TP_NUMA_CACHE", str(tmp_path))
    path = model_registry.resolve("gemma3-270m")
    assert path.parent == tmp_path
    assert path.stat().st_size == gemma_path.stat().st_size
    assert model_registry.file_sha256(path) == model_registry.MODELS["gemma3-270m"].sha256
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    out, err = capfd.readouterr()
    assert out == ""  # messages go to stderr only
    assert "assembling" in err


@pytest.mark.slow
def test_corrupt_cached_file_is_replaced(gemma_path, monkeypatch, tmp_path):
    monkeypatch.setenv("TP_NUMA_CACHE", str(tmp_path))
    spec = model_registry.MODELS["gemma3-270m"]
    bad = tmp_path / spec.filename
    with open(bad, "wb") as f:  # right size, wrong bytes, no stamp
        f.truncate(spec.size)
    path = model_registry.resolve("gemma3-270m", quiet=True)
    assert path == bad
    assert model_registry.file_sha256(path) == spec.sha256


@pytest.mark.slow
def test_hand_placed_file_is_hashed_once_and_stamped(gemma_path, monkeypatch, tmp_path):
    monkeypatch.setenv("TP_NUMA_CACHE", str(tmp_path))
    spec = model_registry.MODELS["gemma3-270m"]
    target = tmp_path / spec.filename
    os.link(gemma_path, target) if os.stat(gemma_path).st_dev == os.stat(tmp_path).st_dev else \
        target.write_bytes(Path(gemma_path).read_bytes())
    assert not model_registry._is_verified(spec, target)
    assert model_registry.resolve("gemma3-270m", quiet=True) == target
    assert model_registry._is_verified(spec, target)
