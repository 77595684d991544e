"""scripts/build_stamp.py: when scripts/setup.sh skips or runs the native build, the
editable install and pip. Checked on a small fake source tree (nothing is compiled)."""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("build_stamp", REPO / "scripts" / "build_stamp.py")
bs = importlib.util.module_from_spec(_spec)
sys.modules["build_stamp"] = bs  # dataclasses look the module up while it executes
_spec.loader.exec_module(bs)

LIB = "_C" + (sysconfig.get_config_var("EXT_SUFFIX") or ".so")


def _bump(path: Path, seconds: float = 2.0) -> None:
    """Move the mtime forward (as an edit or `touch` would), whatever the clock granularity."""
    st = path.stat()
    t = st.st_mtime_ns + int(seconds * 1e9)
    os.utime(path, ns=(t, t))


def _edit(path: Path, text: str) -> None:
    path.write_text(text)
    _bump(path)


def _build(root: Path, env=None, torch_version="2.13.0") -> None:
    """What scripts/build_ext.sh does around the compiler: snapshot, 'build', commit."""
    bs.begin(root, torch_version=torch_version, env=env)
    (root / "tp_numa" / LIB).write_bytes(b"\x7fELF fake library")
    bs.commit(root)


@pytest.fixture
def tree(tmp_path) -> Path:
    (tmp_path / "csrc" / "quant").mkdir(parents=True)
    (tmp_path / "tp_numa").mkdir()
    (tmp_path / "csrc" / "registration.cpp").write_text("// ops\n")
    (tmp_path / "csrc" / "quant" / "scalar.cpp").write_text('#include "quant/kernels.h"\n')
    (tmp_path / "csrc" / "quant" / "kernels.h").write_text("#pragma once\n")
    (tmp_path / "csrc" / "quant" / "simd_kernels.inc").write_text("// body\n")
    (tmp_path / "csrc" / "NOTES.md").write_text("not a build input\n")
    (tmp_path / "setup.py").write_text("# flags: -O3\n")
    _build(tmp_path)
    return tmp_path


def decide(root, **kw):
    kw.setdefault("torch_version", "2.13.0")
    return bs.decide(root, **kw)


def test_unchanged_tree_is_up_to_date(tree):
    d = decide(tree)
    assert d.action == bs.UP_TO_DATE, d.reasons
    assert d.reasons == []


def test_no_stamp_builds(tree):
    (tree / bs.STAMP).unlink()
    d = decide(tree)
    assert d.action == bs.BUILD
    assert "no build stamp" in d.reasons[0]


@pytest.mark.parametrize("name", ["csrc/quant/scalar.cpp", "csrc/quant/kernels.h",
                                  "csrc/quant/simd_kernels.inc", "setup.py"])
def test_touched_input_builds(tree, name):
    _bump(tree / name)
    d = decide(tree)
    assert d.action == bs.BUILD
    assert d.reasons == [f"touched {name}"]


@pytest.mark.parametrize("name", ["csrc/quant/scalar.cpp", "csrc/quant/kernels.h",
                                  "csrc/quant/simd_kernels.inc", "setup.py"])
def test_edited_input_builds(tree, name):
    _edit(tree / name, "// edited\n")
    d = decide(tree)
    assert d.action == bs.BUILD
    assert d.reasons == [f"changed {name}"]


def test_added_and_removed_sources_build(tree):
    (tree / "csrc" / "moe").mkdir()
    (tree / "csrc" / "moe" / "moe.cpp").write_text("// new\n")
    (tree / "csrc" / "registration.cpp").unlink()
    d = decide(tree)
    assert d.action == bs.BUILD
    assert d.reasons == ["new file csrc/moe/moe.cpp", "removed csrc/registration.cpp"]


def test_other_files_do_not_matter(tree):
    _edit(tree / "csrc" / "NOTES.md", "edited\n")
    (tree / "tp_numa" / "cli.py").write_text("# python is not compiled\n")
    assert decide(tree).action == bs.UP_TO_DATE


def test_torch_version_change_is_a_clean_build(tree):
    d = decide(tree, torch_version="2.14.0")
    assert d.action == bs.CLEAN
    assert any("torch" in r and "2.14.0" in r for r in d.reasons), d.reasons


def test_flag_variables_and_compiler_are_part_of_the_toolchain(tree):
    env = dict(os.environ, CXXFLAGS="-O0 -g")
    assert decide(tree, env=env).action == bs.CLEAN
    env = dict(os.environ, CXX="no-such-compiler-xyz")
    d = decide(tree, env=env)
    assert d.action == bs.CLEAN
    assert any("no-such-compiler-xyz" in r for r in d.reasons), d.reasons
    # Built with those flags, the same flags are up to date again.
    env = dict(os.environ, CXXFLAGS="-O0 -g")
    _build(tree, env=env)
    assert decide(tree, env=env).action == bs.UP_TO_DATE


def test_content_change_without_newer_mtime_is_a_clean_build(tree):
    # e.g. `cp -p` of an older copy: ninja compares mtimes and would keep the stale object.
    src = tree / "csrc" / "quant" / "scalar.cpp"
    st = src.stat()
    src.write_text("// same mtime, other content\n")
    os.utime(src, ns=(st.st_atime_ns, st.st_mtime_ns))
    d = decide(tree)
    assert d.action == bs.CLEAN
    assert "mtime did not move forward" in d.reasons[0]


def test_missing_or_replaced_library_builds(tree):
    lib = tree / "tp_numa" / LIB
    lib.write_bytes(b"\x7fELF built by someone else, e.g. pip install -e .")
    d = decide(tree)
    assert d.action == bs.BUILD and "replaced" in d.reasons[0]
    lib.unlink()
    d = decide(tree)
    assert d.action == bs.BUILD and "missing" in d.reasons[0]


def test_failed_build_keeps_the_old_stamp(tree):
    _edit(tree / "csrc" / "quant" / "scalar.cpp", "// does not compile\n")
    bs.begin(tree, torch_version="2.13.0")  # the compiler fails: no commit
    assert decide(tree).action == bs.BUILD


def test_edit_during_a_build_is_seen_next_time(tree):
    bs.begin(tree, torch_version="2.13.0")
    _edit(tree / "csrc" / "quant" / "kernels.h", "// edited while compiling\n")
    (tree / "tp_numa" / LIB).write_bytes(b"\x7fELF new")
    bs.commit(tree)
    d = decide(tree)
    assert d.action == bs.BUILD
    assert d.reasons == ["changed csrc/quant/kernels.h"]


def test_commit_without_library_fails_clearly(tree):
    (tree / "tp_numa" / LIB).unlink()
    bs.begin(tree, torch_version="2.13.0")
    with pytest.raises(SystemExit, match="did not produce"):
        bs.commit(tree)


def test_command_line_prints_one_word(tree):
    """What build_ext.sh --if-changed reads: the action on stdout, the reasons on stderr."""
    cmd = [sys.executable, str(REPO / "scripts" / "build_stamp.py"), "--root", str(tree), "check"]
    # The snapshot above used torch 2.13.0 as a stand-in; store the real toolchain first.
    bs.begin(tree)
    bs.commit(tree)
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert (p.returncode, p.stdout, p.stderr) == (0, "up-to-date\n", "")
    _bump(tree / "csrc" / "quant" / "scalar.cpp")
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert (p.returncode, p.stdout) == (0, "build\n")
    assert "touched csrc/quant/scalar.cpp" in p.stderr


def test_repository_inputs_cover_what_setup_py_compiles():
    inputs = {str(p) for p in bs.source_files(REPO)}
    cpps = {str(p.relative_to(REPO)) for p in (REPO / "csrc").rglob("*.cpp")}
    headers = {str(p.relative_to(REPO)) for ext in ("*.h", "*.inc") for p in (REPO / "csrc").rglob(ext)}
    assert cpps and headers
    assert cpps | headers | {"setup.py"} <= inputs


def test_missing_requirements():
    assert bs.missing_requirements(["pytest", "pytest>=1.0"]) == []
    assert bs.missing_requirements(["pytest>=9999"]) == ["pytest>=9999"]
    assert bs.missing_requirements(["no-such-package-xyz-tp-numa"]) == ["no-such-package-xyz-tp-numa"]
    # A marker that does not apply here is not missing (pip would skip it as well).
    assert bs.missing_requirements(["no-such-package-xyz-tp-numa; python_version < '3.0'"]) == []


def test_build_ext_rejects_unknown_options():
    p = subprocess.run(["bash", str(REPO / "scripts" / "build_ext.sh"), "--bogus"],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 2
    assert "unknown option '--bogus'" in p.stderr and "--if-changed" in p.stderr
