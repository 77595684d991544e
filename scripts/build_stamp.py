#!/usr/bin/env python3
"""What `scripts/setup.sh` may skip: the native build, the editable install, pip.

A second `bash scripts/setup.sh` with nothing changed should take seconds, not a full
compile of csrc/. This module makes the three decisions that allow it, from stamps kept in
build/ (ignored by git; deleting build/ forces everything again):

native build (`check`, `begin`, `commit`)
    The stamp build/native-build.json records what the last successful build of
    tp_numa._C was made from: every csrc/ source and header and setup.py (content hash,
    size, mtime), the toolchain (torch version and location, Python, extension suffix,
    compiler, compiler/linker flag variables) and the library it produced. `check` prints
    one word:

    ``up-to-date``  nothing changed: skip the build entirely;
    ``build``       a source, header or setup.py was added, removed, edited or touched, or
                    the library is missing or was replaced: run the incremental ninja build
                    (ninja recompiles only the objects whose inputs are newer, headers
                    included through its depfiles);
    ``clean``       the toolchain changed, or a file's content changed while its mtime did
                    not move forward (ninja, which compares mtimes, would miss it): throw
                    away the objects and rebuild everything.

    The snapshot is taken *before* the build (`begin`) and stored only after it succeeded
    (`commit`), so a source edited while the compiler runs is seen as changed next time.

editable install (`install-check`, `install-commit`)
    ``up-to-date`` when tp_numa is installed in this interpreter as an editable install of
    this checkout, its `tp-numa` script exists, and pyproject.toml is unchanged since.

requirements (`missing REQ...`)
    Prints the requirements (pip syntax, markers allowed) that are not installed at an
    acceptable version, one per line: pip itself takes seconds even when all is there.

Only the standard library is needed (plus `packaging`, or pip's vendored copy, for
`missing`), so it runs in a fresh venv before anything is installed.
"""
from __future__ import annotations

import argparse
import hashlib
import importlib.metadata as md
import json
import os
import shutil
import subprocess
import sys
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STAMP = Path("build") / "native-build.json"
PENDING = Path("build") / "native-build.pending.json"
INSTALL_STAMP = Path("build") / "editable-install.json"

SOURCE_DIR = "csrc"
SOURCE_SUFFIXES = (".cpp", ".cc", ".c", ".h", ".hpp", ".inc")
# Outside csrc/ but part of the build: setup.py holds the source list and the compile flags.
EXTRA_INPUTS = ("setup.py",)
# Variables the compiler driver (distutils / torch.utils.cpp_extension) reads.
FLAG_VARS = ("CC", "CXX", "CFLAGS", "CXXFLAGS", "CPPFLAGS", "LDFLAGS", "LDSHARED", "ARCHFLAGS")

UP_TO_DATE, BUILD, CLEAN = "up-to-date", "build", "clean"


@dataclass
class Decision:
    action: str  # UP_TO_DATE, BUILD or CLEAN (see the module docstring)
    reasons: list[str] = field(default_factory=list)


# ---------------------------------------------------------------------------- snapshot

def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _file_entry(path: Path) -> dict:
    st = path.stat()
    return {"sha256": _sha256(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def source_files(root: Path) -> list[Path]:
    """The build inputs, relative to root: csrc/** sources and headers, then setup.py."""
    root = Path(root)
    found = sorted(p.relative_to(root) for p in (root / SOURCE_DIR).rglob("*")
                   if p.suffix in SOURCE_SUFFIXES and p.is_file())
    return found + [Path(n) for n in EXTRA_INPUTS if (root / n).is_file()]


def _compiler_id(env) -> str:
    # torch.utils.cpp_extension compiles with $CXX, else c++; its version decides the objects.
    cxx = env.get("CXX") or "c++"
    exe = shutil.which(cxx.split()[0]) if cxx.split() else None
    if exe is None:
        return f"{cxx}: not found"
    try:
        out = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as e:
        return f"{exe}: {e}"
    return f"{os.path.realpath(exe)}: {out.splitlines()[0] if out else '?'}"


def _torch_id() -> dict:
    # From the package metadata, not `import torch` (two seconds or more on a small machine).
    try:
        dist = md.distribution("torch")
    except md.PackageNotFoundError:
        return {"version": None, "location": None}
    return {"version": dist.version, "location": str(dist.locate_file(""))}


def toolchain(torch_version: str | None = None, env=None) -> dict:
    """Everything outside the sources that changes the objects; a difference means a clean build."""
    env = os.environ if env is None else env
    torch = _torch_id()
    if torch_version is not None:
        torch["version"] = torch_version
    return {
        "torch": torch,
        "python": f"{sys.implementation.name} {sys.version.split()[0]}",
        "ext_suffix": sysconfig.get_config_var("EXT_SUFFIX"),
        "compiler": _compiler_id(env),
        "flags": {k: env[k] for k in FLAG_VARS if env.get(k)},
    }


def library_path(root: Path) -> Path:
    return Path(root) / "tp_numa" / ("_C" + (sysconfig.get_config_var("EXT_SUFFIX") or ".so"))


def snapshot(root: Path, torch_version: str | None = None, env=None) -> dict:
    root = Path(root)
    return {
        "sources": {str(p): _file_entry(root / p) for p in source_files(root)},
        "toolchain": toolchain(torch_version, env),
    }


# ---------------------------------------------------------------------------- decision

def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return "unreadable"


def _toolchain_changes(old: dict, new: dict) -> list[str]:
    out = []
    for key in sorted(set(old) | set(new)):
        if old.get(key) != new.get(key):
            out.append(f"{key}: {old.get(key)!r} -> {new.get(key)!r}")
    return out


def decide(root: Path = ROOT, torch_version: str | None = None, env=None,
           stamp: Path | None = None) -> Decision:
    """Whether the native extension must be rebuilt; see the module docstring.

    ``torch_version`` stands in for the installed torch's version (tests)."""
    root = Path(root)
    stamp_path = root / (stamp or STAMP)
    old = _read_json(stamp_path)
    if old is None:
        return Decision(BUILD, [f"no build stamp {stamp_path.relative_to(root)} (first build, or build/ was removed)"])
    if not isinstance(old, dict) or not {"sources", "toolchain", "library"} <= set(old):
        return Decision(BUILD, [f"build stamp {stamp_path.relative_to(root)} is unreadable"])
    new = snapshot(root, torch_version, env)

    changes = _toolchain_changes(old["toolchain"], new["toolchain"])
    if changes:
        return Decision(CLEAN, ["toolchain changed: " + c for c in changes])

    reasons, clean = [], []
    old_src, new_src = old["sources"], new["sources"]
    for name in sorted(set(old_src) | set(new_src)):
        a, b = old_src.get(name), new_src.get(name)
        if a is None:
            reasons.append(f"new file {name}")
        elif b is None:
            reasons.append(f"removed {name}")
        elif a["sha256"] != b["sha256"] or a["size"] != b["size"]:
            if b["mtime_ns"] <= a["mtime_ns"]:
                clean.append(f"{name} changed but its mtime did not move forward (ninja would not see it)")
            else:
                reasons.append(f"changed {name}")
        elif a["mtime_ns"] != b["mtime_ns"]:
            reasons.append(f"touched {name}")
    if clean:
        return Decision(CLEAN, clean + reasons)

    lib = library_path(root)
    rec = old["library"]
    if not lib.is_file():
        reasons.append(f"{lib.relative_to(root)} is missing")
    else:
        st = lib.stat()
        if rec.get("name") != lib.name or rec.get("size") != st.st_size or rec.get("mtime_ns") != st.st_mtime_ns:
            reasons.append(f"{lib.relative_to(root)} was replaced since the last build")
    return Decision(BUILD, reasons) if reasons else Decision(UP_TO_DATE)


def _write_json_atomic(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, path)


def begin(root: Path = ROOT, torch_version: str | None = None, env=None) -> None:
    """Snapshot the inputs just before a build starts."""
    _write_json_atomic(Path(root) / PENDING, snapshot(root, torch_version, env))


def commit(root: Path = ROOT) -> None:
    """After a successful build: the snapshot from `begin` plus the library it produced."""
    root = Path(root)
    data = _read_json(root / PENDING)
    if not isinstance(data, dict):
        raise SystemExit(f"build_stamp: no snapshot {PENDING} (run `begin` before the build)")
    lib = library_path(root)
    if not lib.is_file():
        raise SystemExit(f"build_stamp: the build did not produce {lib.relative_to(root)}")
    st = lib.stat()
    data["library"] = {"name": lib.name, "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    _write_json_atomic(root / STAMP, data)
    (root / PENDING).unlink()


# ---------------------------------------------------------------------------- editable install

def _pyproject_sha(root: Path) -> str:
    return _sha256(Path(root) / "pyproject.toml")


def install_decision(root: Path = ROOT) -> Decision:
    """Whether `pip install -e .` must run (registering tp_numa and its `tp-numa` script)."""
    root = Path(root)
    try:
        dist = md.distribution("tp_numa")
    except md.PackageNotFoundError:
        return Decision(BUILD, ["tp_numa is not installed in this interpreter"])
    url = json.loads(dist.read_text("direct_url.json") or "{}")
    if not url.get("dir_info", {}).get("editable") or url.get("url") != root.resolve().as_uri():
        return Decision(BUILD, [f"tp_numa is installed, but not as an editable install of {root.resolve()}"])
    script = Path(sysconfig.get_path("scripts")) / "tp-numa"
    if not script.is_file():
        return Decision(BUILD, [f"{script} is missing"])
    old = _read_json(root / INSTALL_STAMP)
    if not isinstance(old, dict) or old.get("pyproject_sha256") != _pyproject_sha(root):
        return Decision(BUILD, ["pyproject.toml changed since the last install (or no install stamp)"])
    return Decision(UP_TO_DATE)


def install_commit(root: Path = ROOT) -> None:
    _write_json_atomic(Path(root) / INSTALL_STAMP, {"pyproject_sha256": _pyproject_sha(root)})


# ---------------------------------------------------------------------------- requirements

def _requirement_class():
    try:
        from packaging.requirements import Requirement
    except ImportError:
        try:  # a fresh venv has no packaging, but pip carries a copy
            from pip._vendor.packaging.requirements import Requirement
        except ImportError:
            return None
    return Requirement


def missing_requirements(reqs: list[str]) -> list[str]:
    """The requirements not met by what is installed (all of them if this cannot be told)."""
    Requirement = _requirement_class()
    if Requirement is None:
        return list(reqs)
    out = []
    for spec in reqs:
        r = Requirement(spec)
        if r.marker is not None and not r.marker.evaluate():
            continue  # not for this Python/platform; pip would ignore it as well
        try:
            version = md.version(r.name)
        except md.PackageNotFoundError:
            out.append(spec)
            continue
        if r.specifier and not r.specifier.contains(version, prereleases=True):
            out.append(spec)
    return out


# ---------------------------------------------------------------------------- command line

def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", type=Path, default=ROOT, help="repository root (default: this script's)")
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("check", help="print up-to-date, build or clean (the reasons go to stderr)")
    sub.add_parser("begin", help="snapshot the build inputs before a build")
    sub.add_parser("commit", help="store the snapshot after a successful build")
    sub.add_parser("install-check", help="print up-to-date or build for the editable install")
    sub.add_parser("install-commit", help="record the editable install")
    m = sub.add_parser("missing", help="print the unmet requirements, one per line")
    m.add_argument("requirements", nargs="*")
    args = p.parse_args(argv)

    if args.cmd in ("check", "install-check"):
        d = decide(args.root) if args.cmd == "check" else install_decision(args.root)
        shown = 8  # a checkout can touch every file; the first few say enough
        for r in d.reasons[:shown]:
            print(f"  {r}", file=sys.stderr)
        if len(d.reasons) > shown:
            print(f"  ... and {len(d.reasons) - shown} more", file=sys.stderr)
        print(d.action)
    elif args.cmd == "begin":
        begin(args.root)
    elif args.cmd == "commit":
        commit(args.root)
    elif args.cmd == "install-commit":
        install_commit(args.root)
    elif args.cmd == "missing":
        for r in missing_requirements(args.requirements):
            print(r)
    return 0


if __name__ == "__main__":
    sys.exit(main())
