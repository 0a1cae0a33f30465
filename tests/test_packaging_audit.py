"""Packaging, public API surface and import hygiene.

What a user gets from ``pip install fastload`` must be what the README describes: a wheel holding every
module the code needs, dependencies that cover every runtime import, a ``fastload`` command, a cheap and
side-effect-free ``import fastload``, and a public API whose names and signatures match the README.

The wheel is built (offline, no build isolation) from a copy of the checkout -- the files git tracks or
would track, nothing ignored -- and installed into a fresh ``venv`` whose dependencies come from this
environment, then used from a directory outside the repository.
"""

from __future__ import annotations

import ast
import contextlib
import dataclasses
import functools
import importlib
import importlib.metadata
import inspect
import io
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import textwrap
import tomllib
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import fastload

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "fastload"
README = (ROOT / "README.md").read_text()
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
PROJECT = PYPROJECT["project"]
PY = sys.executable
TIMEOUT = 120


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _req_name(req: str) -> str:
    return _norm(re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", req).group(1))


def _run(args, *, cwd=None, env=None, timeout=TIMEOUT, check=True) -> subprocess.CompletedProcess:
    full_env = dict(os.environ)
    full_env.update({"PIP_DISABLE_PIP_VERSION_CHECK": "1", "PIP_NO_INPUT": "1", "PYTHONDONTWRITEBYTECODE": "1"})
    full_env.pop("PYTHONPATH", None)
    full_env.update(env or {})
    proc = subprocess.run([str(a) for a in args], cwd=cwd, env=full_env, capture_output=True, text=True,
                          timeout=timeout, check=False)
    if check and proc.returncode != 0:
        raise AssertionError(f"{args} exited {proc.returncode}\nstdout:\n{proc.stdout[-4000:]}\n"
                             f"stderr:\n{proc.stderr[-4000:]}")
    return proc


def _package_files() -> set[str]:
    """Every file under fastload/ a wheel should carry (relative to the repo root), caches excluded."""
    return {p.relative_to(ROOT).as_posix() for p in PKG.rglob("*")
            if p.is_file() and "__pycache__" not in p.parts and p.suffix not in (".pyc", ".pyo")}


def _checkout_files() -> list[str]:
    """What a clean checkout holds: tracked files plus untracked ones git would not ignore (read-only git)."""
    try:
        out = subprocess.run(["git", "-C", str(ROOT), "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
                             capture_output=True, check=True, timeout=30).stdout
        files = [f for f in out.decode().split("\0") if f]
    except (OSError, subprocess.CalledProcessError):
        files = ["pyproject.toml", "README.md"] + sorted(_package_files())
    return [f for f in files if (ROOT / f).is_file()]


# -- the build ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def build(tmp_path_factory):
    """sdist from a clean copy of the checkout, then the wheel from that sdist (what ``python -m build`` does)."""
    base = tmp_path_factory.mktemp("pkgbuild")
    src = base / "src"
    for rel in _checkout_files():
        if rel.startswith(("tests/", "benchmarks/")):
            continue  # not part of the package; keeps the copy small
        dst = src / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / rel, dst)
    sdist_dir, wheel_dir = base / "sdist", base / "wheel"
    sdist_proc = _run([PY, "-W", "always", "-c",
                       "import sys; from setuptools import build_meta as b; print(b.build_sdist(sys.argv[1]))",
                       sdist_dir], cwd=src)
    sdist = sdist_dir / sdist_proc.stdout.strip().splitlines()[-1]
    wheel_proc = _run([PY, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", wheel_dir,
                       sdist], cwd=base)
    wheels = list(wheel_dir.glob("fastload-*.whl"))
    assert len(wheels) == 1, wheel_proc.stdout
    log = sdist_proc.stdout + sdist_proc.stderr + wheel_proc.stdout + wheel_proc.stderr
    return {"sdist": sdist, "wheel": wheels[0], "log": log, "base": base}


@pytest.fixture(scope="module")
def wheel_names(build) -> list[str]:
    with zipfile.ZipFile(build["wheel"]) as z:
        return z.namelist()


@pytest.fixture(scope="module")
def wheel_metadata(build) -> str:
    with zipfile.ZipFile(build["wheel"]) as z:
        name = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        return z.read(name).decode()


@pytest.fixture(scope="module")
def fresh_venv(build, tmp_path_factory):
    """A new venv (--system-site-packages), the wheel installed into it offline; dependencies from this venv."""
    base = tmp_path_factory.mktemp("pkgvenv")
    venv = base / "venv"
    _run([getattr(sys, "_base_executable", PY), "-m", "venv", "--without-pip", "--system-site-packages", venv])
    vpy = venv / "bin" / "python"
    site = Path(_run([vpy, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip())
    # this environment's site-packages as a plain path: its dependencies, but not its editable fastload finder
    (site / "_audit_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    _run([PY, "-m", "pip", "--python", vpy, "install", "--no-deps", "--no-index", build["wheel"]], cwd=base)
    work = base / "outside"
    work.mkdir()
    return {"venv": venv, "python": vpy, "site": site, "work": work}


def test_sdist_holds_the_package_and_its_metadata(build):
    import tarfile

    with tarfile.open(build["sdist"]) as t:
        names = {n.split("/", 1)[1] for n in t.getnames() if "/" in n}
    missing = sorted(f for f in _package_files() | {"pyproject.toml", "README.md"} if f not in names)
    assert not missing, f"sdist lacks {missing}"


def test_wheel_contains_every_file_of_the_package(wheel_names):
    in_wheel = {n for n in wheel_names if not n.split("/")[0].endswith(".dist-info")}
    missing = sorted(_package_files() - in_wheel)
    assert not missing, f"the wheel lacks files the package has (a clean checkout does not have them?): {missing}"
    for sub in ("bench", "format", "sinks", "sources", "integrations"):
        assert f"fastload/{sub}/__init__.py" in in_wheel
    strays = sorted({n.split("/")[0] for n in in_wheel} - {"fastload"})
    assert not strays, f"the wheel installs top-level names besides fastload: {strays}"


def test_wheel_metadata_matches_pyproject(wheel_metadata, wheel_names):
    meta = wheel_metadata
    assert re.search(r"^Name: fastload$", meta, re.M)
    assert re.search(rf"^Version: {re.escape(fastload.__version__)}$", meta, re.M)
    assert re.search(rf"^Requires-Python: {re.escape(PROJECT['requires-python'])}$", meta, re.M)
    core = {_req_name(r) for r in re.findall(r"^Requires-Dist: ([^;\n]+)$", meta, re.M)}
    assert core == {_req_name(r) for r in PROJECT["dependencies"]}
    assert "Description-Content-Type: text/markdown" in meta
    entry = next(n for n in wheel_names if n.endswith(".dist-info/entry_points.txt"))
    assert entry


def test_wheel_declares_the_fastload_console_script(build):
    with zipfile.ZipFile(build["wheel"]) as z:
        name = next(n for n in z.namelist() if n.endswith(".dist-info/entry_points.txt"))
        text = z.read(name).decode()
    assert "[console_scripts]" in text
    assert re.search(r"^fastload\s*=\s*fastload\.cli:main\s*$", text, re.M), text


def test_build_emits_no_deprecation_warnings(build):
    """setuptools announces that a TOML-table ``project.license`` stops building on 2027-02-18: a release
    process must not depend on a build configuration with an expiry date."""
    hits = [line.strip() for line in build["log"].splitlines()
            if re.search(r"Deprecat|BuildBackendWarning|will no longer be supported", line)]
    assert not hits, "building fastload warns:\n" + "\n".join(dict.fromkeys(hits))


def test_wheel_ships_the_license_it_declares(wheel_names, wheel_metadata):
    """Apache-2.0 (section 4a) requires giving recipients a copy of the license: the wheel must carry it."""
    declared = re.search(r"^License(?:-Expression)?: (.+)$", wheel_metadata, re.M)
    assert declared, "no license declared"
    license_files = [n for n in wheel_names
                     if re.search(r"(^|/)(LICEN[CS]E|COPYING|NOTICE)[^/]*$", n, re.I)]
    assert license_files, (f"the wheel declares {declared.group(1)!r} but carries no license text "
                           f"(no LICENSE file in the repo, no License-File in METADATA)")


def test_installed_wheel_works_outside_the_repository(fresh_venv, tmp_path):
    ckpt = tmp_path / "small.safetensors"
    tensors = {"a.weight": torch.arange(12, dtype=torch.float32).reshape(3, 4),
               "b.bias": torch.tensor([1, 2, 3], dtype=torch.int64), "c": torch.randn(5).to(torch.bfloat16)}
    save_file(tensors, ckpt)
    script = textwrap.dedent(f"""
        import importlib, importlib.metadata, json, pkgutil, sys
        from pathlib import Path
        import fastload
        from safetensors.torch import load_file
        import torch
        site = Path({str(fresh_venv['site'])!r})
        assert Path(fastload.__file__).resolve().is_relative_to(site.resolve()), fastload.__file__
        assert importlib.metadata.version("fastload") == fastload.__version__
        failed = []
        for mod in pkgutil.walk_packages(fastload.__path__, "fastload."):
            if mod.name == "fastload.__main__":
                continue
            try:
                m = importlib.import_module(mod.name)
                assert Path(m.__file__).resolve().is_relative_to(site.resolve()), m.__file__
            except Exception as exc:
                failed.append(f"{{mod.name}}: {{exc!r}}")
        assert not failed, failed
        sd = fastload.load({str(ckpt)!r})
        ref = load_file({str(ckpt)!r})
        assert list(sd) == list(ref)
        for k in ref:
            assert sd[k].dtype == ref[k].dtype and torch.equal(sd[k], ref[k]), k
        p = fastload.plan({str(ckpt)!r})
        assert isinstance(p, fastload.LoadPlan)
        # every dependency the wheel requires is present in a satisfying version
        from packaging.requirements import Requirement
        bad = []
        for line in importlib.metadata.requires("fastload") or []:
            req = Requirement(line)
            if req.marker is not None:
                continue
            try:
                have = importlib.metadata.version(req.name)
            except importlib.metadata.PackageNotFoundError:
                bad.append(f"{{req}}: missing"); continue
            if not req.specifier.contains(have, prereleases=True):
                bad.append(f"{{req}}: have {{have}}")
        assert not bad, bad
        print("OK")
    """)
    out = _run([fresh_venv["python"], "-c", script], cwd=fresh_venv["work"])
    assert out.stdout.strip().endswith("OK")
    # the console script the wheel installed, and python -m fastload, from outside the repo
    cmd = fresh_venv["venv"] / "bin" / "fastload"
    assert cmd.exists(), "installing the wheel created no fastload command"
    insp = _run([cmd, "inspect", ckpt, "--json"], cwd=fresh_venv["work"])
    doc = json.loads(insp.stdout)
    assert {t["name"] for t in doc["tensors"]} == set(tensors)
    loaded = _run([cmd, "load", ckpt, "--json"], cwd=fresh_venv["work"])
    fetched = json.loads(loaded.stdout)["bytes_fetched"]
    assert sum(t.nbytes for t in tensors.values()) <= fetched <= ckpt.stat().st_size
    ver = _run([fresh_venv["python"], "-m", "fastload", "--version"], cwd=fresh_venv["work"])
    assert ver.stdout.strip() == f"fastload {fastload.__version__}"


# -- pyproject / dependencies ------------------------------------------------------------------------

def test_version_is_one_number_everywhere():
    assert PROJECT["version"] == fastload.__version__
    assert importlib.metadata.version("fastload") == fastload.__version__


def test_console_script_and_python_m_work(tmp_path):
    script = Path(PY).parent / "fastload"
    assert script.exists()
    out = _run([script, "--help"], cwd=tmp_path)
    for sub in ("bench", "inspect", "load", "pull"):
        assert sub in out.stdout
    ver = _run([PY, "-m", "fastload", "--version"], cwd=tmp_path)
    assert ver.stdout.strip() == f"fastload {fastload.__version__}"
    assert PYPROJECT["project"]["scripts"] == {"fastload": "fastload.cli:main"}


def test_torch_is_a_floor_not_an_exact_pin():
    torch_reqs = [r for r in PROJECT["dependencies"] if _req_name(r) == "torch"]
    assert len(torch_reqs) == 1
    spec = torch_reqs[0][len("torch"):]
    assert "==" not in spec and "~=" not in spec and "<" not in spec, torch_reqs
    assert re.fullmatch(r"\s*>=\s*2\.1\s*", spec), f"README says any torch >= 2.1 works; pyproject says {spec!r}"


def test_s3fs_pins_are_recent():
    for name, reqs in PROJECT["optional-dependencies"].items():
        for r in reqs:
            if _req_name(r) == "s3fs":
                assert re.search(r">=\s*2024", r), f"extra {name}: {r}"


def test_documented_extras_exist():
    extras = PROJECT["optional-dependencies"]
    for extra in re.findall(r"fastload\[(\w+)\]", README):
        assert extra in extras, f"README's fastload[{extra}] is not an extra"
    assert any(re.fullmatch(r"transformers\s*>=\s*5", r) for r in extras["transformers"]), "README: transformers >= 5"
    assert any(_req_name(r) == "opentelemetry-api" for r in extras["otel"])


def _third_party_imports() -> list[tuple[str, str, int, bool]]:
    """(file, top-level module, line, at module level) for every absolute non-stdlib import in fastload/."""
    found = []
    for path in sorted(PKG.rglob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        top_level = {id(n) for n in tree.body}
        # an import directly under a module-level try/if counts as module level too
        for n in tree.body:
            if isinstance(n, (ast.Try, ast.If)):
                top_level |= {id(x) for x in ast.walk(n)}
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top in sys.stdlib_module_names or top in ("fastload", "__future__"):
                    continue
                found.append((path.relative_to(ROOT).as_posix(), top, node.lineno, id(node) in top_level))
    return found


def test_every_runtime_import_is_a_declared_dependency():
    """Core modules may import only the core dependencies (or, lazily, an extra's); ``fastload/bench`` and
    ``fastload/integrations`` may also use their extras. A module imported directly must be declared directly:
    a transitive dependency (something a dependency happens to pull in today) is not a contract."""
    core = {_req_name(r) for r in PROJECT["dependencies"]}
    extras = {k: {_req_name(r) for r in v} for k, v in PROJECT["optional-dependencies"].items()}
    all_extras = set().union(*(v for k, v in extras.items() if k != "test"))
    dists = {k: {_norm(d) for d in v} for k, v in importlib.metadata.packages_distributions().items()}
    problems = []
    for file, top, line, module_level in _third_party_imports():
        # Not installed here (an extra the test set-up does not install, e.g. matplotlib): its module name is
        # its distribution's name.
        provided = dists.get(top) or {_norm(top)}
        if file.startswith("fastload/bench/"):
            allowed = core | extras.get("bench", set())
        elif file.startswith("fastload/integrations/"):
            allowed = core | extras.get("transformers", set())
        elif module_level:
            allowed = core
        else:
            allowed = core | all_extras
        if not provided & allowed:
            problems.append(f"{file}:{line}: imports {top!r} (from {sorted(provided)}), not declared "
                            f"{'in dependencies' if module_level else 'in dependencies or an extra'}")
    assert not problems, "\n".join(problems)


def test_optional_extras_are_really_optional(tmp_path):
    """Without transformers, opentelemetry and the benchmark's loaders, every module imports, the CLI's help
    works, and the features that need them fail with fastload's own error naming the extra."""
    model = tmp_path / "model"
    model.mkdir()
    save_file({"w": torch.ones(4)}, model / "model.safetensors")
    (model / "config.json").write_text(json.dumps({"model_type": "llama", "dtype": "float32",
                                                   "architectures": ["LlamaForCausalLM"]}))
    script = textwrap.dedent(f"""
        import sys, importlib, pkgutil, contextlib, io
        for m in ("transformers", "opentelemetry", "s3fs", "boto3", "matplotlib", "huggingface_hub", "psutil",
                  "runai_model_streamer", "fastsafetensors", "tensorizer", "moto", "uvloop"):
            sys.modules[m] = None
        import fastload
        failed = []
        for mod in pkgutil.walk_packages(fastload.__path__, "fastload."):
            if mod.name == "fastload.__main__":
                continue
            try:
                importlib.import_module(mod.name)
            except Exception as exc:
                failed.append(f"{{mod.name}}: {{exc!r}}")
        assert not failed, failed
        from fastload.cli import main
        for argv in (["--help"], ["bench", "--help"], ["load", "--help"]):
            with contextlib.redirect_stdout(io.StringIO()):
                try:
                    main(argv)
                except SystemExit as e:
                    assert e.code == 0, (argv, e.code)
        try:
            fastload.from_pretrained({str(model)!r})
        except fastload.ConfigError as e:
            assert "fastload[transformers]" in str(e), e
        else:
            raise AssertionError("from_pretrained without transformers did not raise")
        try:
            fastload.Trace(otel=True)
        except fastload.ConfigError as e:
            assert "opentelemetry" in str(e), e
        else:
            raise AssertionError("Trace(otel=True) without opentelemetry did not raise")
        print("OK")
    """)
    out = _run([PY, "-c", script], cwd=tmp_path)
    assert out.stdout.strip().endswith("OK")


def test_py_typed_marker_if_typing_is_advertised(wheel_names):
    classifiers = PROJECT.get("classifiers", [])
    advertised = any("Typing :: Typed" in c for c in classifiers) or re.search(r"py\.typed|type[- ]checked|PEP 561",
                                                                              README, re.I)
    if not advertised:
        assert "fastload/py.typed" not in wheel_names or (PKG / "py.typed").exists()
        return
    assert (PKG / "py.typed").exists() and "fastload/py.typed" in wheel_names


# -- torch / Python floors ----------------------------------------------------------------------------

def test_cuda_error_mapping_works_on_the_oldest_supported_torch(tmp_path):
    """README: any torch >= 2.1. ``torch.OutOfMemoryError`` only exists since torch 2.4/2.5 (before, it is
    ``torch.cuda.OutOfMemoryError`` alone), so mapping a CUDA OOM to ``DeviceError`` must not need it. The
    older torch is simulated by removing the newer top-level alias (torch's own attribute, not fastload code)."""
    script = textwrap.dedent("""
        import torch
        oom_cls = torch.cuda.OutOfMemoryError
        if hasattr(torch, "OutOfMemoryError"):
            del torch.OutOfMemoryError   # torch 2.1 - 2.3 have only torch.cuda.OutOfMemoryError
        from fastload.errors import DeviceError
        from fastload.sinks.cuda import device_error
        err = device_error(oom_cls("CUDA out of memory. Tried to allocate 2.00 GiB"), "allocating", "cuda:0")
        assert isinstance(err, DeviceError), type(err)
        assert "out of memory" in str(err), str(err)
        err = device_error(RuntimeError("CUDA error: an illegal memory access"), "copying", "cuda:0")
        assert isinstance(err, DeviceError), type(err)
        print("OK")
    """)
    out = _run([PY, "-c", script], cwd=tmp_path, check=False)
    assert out.returncode == 0 and out.stdout.strip().endswith("OK"), out.stderr[-2000:]


@functools.cache
def _other_python(version: str) -> str | None:
    pyenv = Path("/root/.pyenv/versions")
    cands = [str(d / "bin" / "python") for d in sorted(pyenv.glob(f"{version}.*"))] if pyenv.is_dir() else []
    cands += [c for c in (shutil.which(f"python{version}"),) if c]
    for cand in cands:
        if not Path(cand).exists():
            continue
        try:
            got = subprocess.run([cand, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
                                 capture_output=True, text=True, timeout=20, check=False)
        except (OSError, subprocess.TimeoutExpired):
            continue
        if got.returncode == 0 and got.stdout.strip() == version:
            return cand
    return None


def test_sources_compile_on_every_supported_python(tmp_path):
    """requires-python >= 3.10: every file compiles on 3.10 and on the newest Pythons without warnings
    (invalid escapes are SyntaxWarnings since 3.12)."""
    floor = re.fullmatch(r">=\s*3\.(\d+)", PROJECT["requires-python"])
    assert floor
    versions = [f"3.{floor.group(1)}", "3.12", "3.13"]
    found = {v: _other_python(v) for v in versions}
    assert any(found.values()), "needs another Python (3.10, 3.12 or 3.13): this project's machines have pyenv's"
    script = textwrap.dedent(f"""
        import pathlib, warnings
        warnings.simplefilter("error")
        bad = []
        for p in sorted(pathlib.Path({str(PKG)!r}).rglob("*.py")):
            try:
                compile(p.read_bytes(), str(p), "exec", dont_inherit=True)
            except (SyntaxError, Warning) as e:
                bad.append(f"{{p}}: {{type(e).__name__}}: {{e}}")
        print("\\n".join(bad) or "OK")
    """)
    for v, exe in found.items():
        if exe:
            out = _run([exe, "-c", script], cwd=tmp_path)
            assert out.stdout.strip() == "OK", f"Python {v}:\n{out.stdout}"


def test_stdlib_names_exist_on_the_oldest_supported_python(tmp_path):
    """Module attributes of the standard library that fastload uses outside a ``sys.version_info`` guard exist
    on the requires-python floor (e.g. ``asyncio.Runner``, ``hashlib.file_digest`` are 3.11+)."""
    floor = re.fullmatch(r">=\s*(3\.\d+)", PROJECT["requires-python"]).group(1)
    exe = _other_python(floor)
    assert exe is not None, f"needs Python {floor} (requires-python's floor): this project's machines have pyenv's"
    uses: dict[tuple[str, str], list[str]] = {}
    for path in sorted(PKG.rglob("*.py")):
        src = path.read_text()
        lines = src.splitlines()
        tree = ast.parse(src)
        guards = [(n.lineno, n.end_lineno) for n in ast.walk(tree)
                  if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.If, ast.Try))
                  and re.search(r"version_info|hasattr|ImportError|AttributeError",
                                "\n".join(lines[n.lineno - 1:n.end_lineno]))]

        def guarded(line: int, guards=guards) -> bool:
            return any(s <= line <= e for s, e in guards)

        aliases = {}
        for n in ast.walk(tree):
            if isinstance(n, ast.Import):
                for a in n.names:
                    if a.name.split(".")[0] in sys.stdlib_module_names:
                        aliases[a.asname or a.name.split(".")[0]] = a.name if a.asname else a.name.split(".")[0]
            elif isinstance(n, ast.ImportFrom) and n.level == 0 and n.module \
                    and n.module.split(".")[0] in sys.stdlib_module_names and not guarded(n.lineno):
                for a in n.names:
                    uses.setdefault((n.module, a.name), []).append(f"{path.relative_to(ROOT)}:{n.lineno}")
        for n in ast.walk(tree):
            if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name) and n.value.id in aliases \
                    and not guarded(n.lineno):
                uses.setdefault((aliases[n.value.id], n.attr), []).append(f"{path.relative_to(ROOT)}:{n.lineno}")
    data = tmp_path / "uses.json"
    data.write_text(json.dumps([[m, a, locs] for (m, a), locs in uses.items()]))
    script = textwrap.dedent(f"""
        import importlib, json
        missing = []
        for mod, attr, locs in json.load(open({str(data)!r})):
            try:
                m = importlib.import_module(mod)
            except ImportError:
                missing.append(f"module {{mod}} ({{locs[0]}})"); continue
            if not hasattr(m, attr):
                try:
                    importlib.import_module(mod + "." + attr)
                except ImportError:
                    missing.append(f"{{mod}}.{{attr}} ({{', '.join(locs[:3])}})")
        print("\\n".join(missing) or "OK")
    """)
    out = _run([exe, "-c", script], cwd=tmp_path)
    assert out.stdout.strip() == "OK", f"missing on Python {floor}:\n{out.stdout}"


# -- import hygiene -----------------------------------------------------------------------------------

HEAVY = ("aiohttp", "botocore", "boto3", "s3fs", "transformers", "yarl", "multidict", "opentelemetry",
         "huggingface_hub", "matplotlib", "safetensors", "fastload.bench", "fastload.integrations.transformers",
         "fastload.sources.http", "fastload.sources.http_threads", "fastload.sources.s3", "fastload.sources.hub")


def test_import_is_cheap_and_side_effect_free(tmp_path):
    script = textwrap.dedent(f"""
        import asyncio, json, logging, os, signal, socket, sys, threading, time, warnings
        import numpy, torch   # fastload's unavoidable base: measured apart
        def tasks(): return len(os.listdir("/proc/self/task"))
        state = lambda: (dict(os.environ), list(sys.path), list(warnings.filters),
                         [signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGPIPE, signal.SIGCHLD)],
                         sys.excepthook, torch.get_default_dtype(), torch.get_num_threads(),
                         list(logging.root.handlers), logging.root.level, socket.getdefaulttimeout(),
                         sys.getrecursionlimit(), os.getcwd(), os.umask(0o22))
        before_state, before_tasks, before_mods = state(), tasks(), set(sys.modules)
        before_fds = set(os.listdir("/proc/self/fd"))
        t = time.perf_counter()
        import fastload
        took = time.perf_counter() - t
        new = sorted(set(sys.modules) - before_mods)
        policy_loop = getattr(getattr(asyncio.get_event_loop_policy(), "_local", None), "_loop", None)
        print(json.dumps({{
            "took": took, "new": new,
            "heavy": [m for m in {HEAVY!r} if m in sys.modules],
            "cuda_init": torch.cuda.is_initialized(),
            "py_threads": [t.name for t in threading.enumerate()],
            "os_threads": [before_tasks, tasks()],
            "fds": sorted(set(os.listdir("/proc/self/fd")) - before_fds),
            "state_same": [a == b for a, b in zip(before_state, state())],
            "loop": repr(policy_loop),
            "loggers_with_handlers": [n for n, l in logging.root.manager.loggerDict.items()
                                      if n.startswith("fastload") and getattr(l, "handlers", None)
                                      and not all(isinstance(h, logging.NullHandler) for h in l.handlers)],
        }}))
    """)
    out = _run([PY, "-c", script], cwd=tmp_path, env={"HOME": str(tmp_path)})
    got = json.loads(out.stdout.strip().splitlines()[-1])
    report = f"import fastload (beyond torch/numpy) took {got['took']:.3f}s, {len(got['new'])} modules"
    print(report)
    assert got["heavy"] == [], f"import fastload eagerly imports {got['heavy']} ({report})"
    assert not got["cuda_init"], "import fastload initialised CUDA"
    assert got["py_threads"] == ["MainThread"], got["py_threads"]
    assert got["os_threads"][0] == got["os_threads"][1], f"import fastload started OS threads: {got['os_threads']}"
    assert got["fds"] == [], f"import fastload left files open: {got['fds']}"
    assert all(got["state_same"]), ("import fastload changed process state (env, sys.path, warnings, signals, "
                                    f"excepthook, torch defaults, logging, socket timeout, ...): {got['state_same']}")
    assert got["loop"] == "None", f"import fastload created an event loop: {got['loop']}"
    assert got["loggers_with_handlers"] == []
    assert got["took"] < 1.0, report
    assert sorted(os.listdir(tmp_path)) == [], f"import fastload wrote into cwd/HOME: {os.listdir(tmp_path)}"


@pytest.mark.skipif(shutil.which("strace") is None, reason="strace not installed")
def test_import_touches_no_file_and_opens_no_socket(tmp_path):
    log = tmp_path / "strace.txt"
    work = tmp_path / "work"
    work.mkdir()
    proc = _run(["strace", "-f", "-qq", "-o", log, "-e",
                 "trace=open,openat,creat,mkdir,mkdirat,unlink,unlinkat,rename,renameat,renameat2,socket,connect",
                 PY, "-c", "import fastload"], cwd=work, env={"HOME": str(work)}, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    writes = []
    for line in log.read_text().splitlines():
        if "ENOENT" in line or "/dev/null" in line:
            continue
        if re.search(r"\bopen(at)?\(.*(O_WRONLY|O_RDWR|O_CREAT)", line) or re.search(
                r"\b(creat|mkdirat?|unlinkat?|rename(at2?)?)\(", line) or re.search(
                r"\bsocket\(AF_INET6?|\bconnect\(", line):
            writes.append(line.split(None, 1)[1][:200])
    assert not writes, "import fastload writes files or opens sockets:\n" + "\n".join(writes[:20])
    assert os.listdir(work) == []


def test_no_module_level_mutable_state_changes_during_a_load(tmp_path):
    """Module-level containers of fastload are constants: a load does not add to them (no global caches,
    registries or per-process pools kept between loads)."""
    ckpt = tmp_path / "m.safetensors"
    save_file({"a": torch.ones(3), "b": torch.zeros(2, dtype=torch.int32)}, ckpt)
    fastload.load(ckpt)  # import everything a local load uses

    def snapshot():
        snap = {}
        for name, mod in list(sys.modules.items()):
            if not name.startswith("fastload") or mod is None:
                continue
            for attr, value in vars(mod).items():
                if isinstance(value, (dict, list, set, bytearray)) and not attr.startswith("__"):
                    try:
                        snap[f"{name}.{attr}"] = repr(value)
                    except Exception:  # pragma: no cover
                        pass
        return snap

    before = snapshot()
    fastload.load(ckpt, dtype="float16", names=["a"])
    fastload.plan(ckpt)
    with fastload.stream(ckpt) as s:
        list(s)
    after = snapshot()
    changed = sorted(k for k in before if before[k] != after.get(k)) + sorted(set(after) - set(before))
    assert not changed, f"module-level state changed by loads: {changed}"


# -- public API and the README ------------------------------------------------------------------------

def test_every_public_name_exists_and_is_in_the_readme():
    ns: dict = {}
    exec("from fastload import *", ns)
    missing_doc = []
    for name in fastload.__all__:
        assert hasattr(fastload, name), name
        assert name in ns, name
        if not re.search(rf"\b{re.escape(name)}\b", README):
            missing_doc.append(name)
    assert not missing_doc, f"public but not in the README: {missing_doc}"
    assert len(set(fastload.__all__)) == len(fastload.__all__)


def test_every_fastload_name_in_the_readme_exists():
    missing = []
    # (not a file name such as "<id>.fastload.incomplete": a name after a dot is no reference to the package)
    for ref in sorted(set(re.findall(r"(?<![.\w])fastload\.([A-Za-z_][\w.]*\w)", README))):
        if ref in ("trace/1",) or ref.startswith("trace/"):
            continue
        obj = fastload
        parts = ref.split(".")
        for i, part in enumerate(parts):
            nxt = getattr(obj, part, None)
            if nxt is None:
                try:
                    nxt = importlib.import_module("fastload." + ".".join(parts[:i + 1]))
                except ImportError:
                    nxt = None
            if nxt is None:
                missing.append(ref)
                break
            obj = nxt
    assert not missing, f"README names fastload.{missing}, which do not exist"


def _params(fn) -> list[tuple[str, str, object]]:
    return [(p.name, p.kind.name, p.default) for p in inspect.signature(fn).parameters.values()]


LOAD_PARAMS = [("source", "POSITIONAL_OR_KEYWORD", inspect.Parameter.empty), ("device", "KEYWORD_ONLY", "cpu"),
               ("dtype", "KEYWORD_ONLY", None), ("names", "KEYWORD_ONLY", None), ("shard", "KEYWORD_ONLY", None),
               ("config", "KEYWORD_ONLY", None), ("trace", "KEYWORD_ONLY", None), ("progress", "KEYWORD_ONLY", None)]


def test_load_and_stream_signatures_match_the_readme_table():
    for row in ("device", "dtype", "names", "shard", "config", "trace", "progress"):
        assert re.search(rf"^\| `{row}` \|", README, re.M), row
    assert _params(fastload.load) == LOAD_PARAMS
    assert _params(fastload.stream) == LOAD_PARAMS


def test_aload_has_loads_signature():
    """README: ``fastload.aload(...)`` is the same as ``load`` for async code; its signature should say so
    (``help()``, IDEs, ``inspect``), as ``apull``'s does for ``pull``."""
    assert _params(fastload.aload) == LOAD_PARAMS
    assert inspect.iscoroutinefunction(fastload.aload)


def test_pull_signature_is_the_documented_one():
    m = re.search(r"`fastload\.pull\((source, \*, [^)]*)\) -> Path`", README)
    assert m
    documented = [p.strip() for p in m.group(1).split(",")]
    expected = [("source", "POSITIONAL_OR_KEYWORD", inspect.Parameter.empty)]
    for p in documented[2:]:
        name, default = p.split("=")
        expected.append((name, "KEYWORD_ONLY", {"None": None, "False": False}[default]))
    assert _params(fastload.pull) == expected
    assert _params(fastload.apull) == expected, "README: apull takes the same arguments"
    assert inspect.iscoroutinefunction(fastload.apull)
    assert inspect.signature(fastload.pull).return_annotation in (Path, "Path")
    fields = [f.name for f in dataclasses.fields(fastload.PullResult)]
    for name in ("path", "fetched", "present", "bytes_fetched", "total_bytes", "removed"):
        assert name in fields, name


def test_other_documented_signatures():
    assert [p[0] for p in _params(fastload.plan)][:1] == ["source"]
    for name in ("names", "shard", "config", "trace"):
        assert name in inspect.signature(fastload.plan).parameters
    fp = inspect.signature(fastload.from_pretrained).parameters
    for name in ("source", "model_class", "dtype", "config", "trace"):
        assert name in fp, name
    assert any(p.kind is inspect.Parameter.VAR_KEYWORD for p in fp.values()), "other kwargs go to transformers"
    shard = fastload.Shard(1, 4, {r"q_proj": 0})
    assert (shard.rank, shard.world_size) == (1, 4)
    fastload.Shard(rank=1, world_size=4, rules={r"(q|k|v)_proj\.weight$": 0, r"o_proj\.weight$": 1})
    assert fastload.Trace(otel=False) is not None
    assert "path" in inspect.signature(fastload.Trace).parameters
    assert isinstance(fastload.Trace().summary(), fastload.TraceSummary)
    assert fastload.Trace().to_dict().get("schema") == "fastload.trace/1"
    assert hasattr(fastload.LoadStream, "__enter__") and hasattr(fastload.LoadStream, "__exit__")
    assert hasattr(fastload.LoadStream, "__iter__")


def test_config_defaults_match_the_readme():
    c = fastload.LoadConfig()
    MiB = 1 << 20
    assert (c.chunk_bytes, c.max_concurrency, c.host_buffer_bytes, c.local_threads) == (64 * MiB, 16, 256 * MiB, 4)
    assert c.local_cold_readers is None and c.direct_io is False and c.http_engine == "threads"
    assert (c.connect_timeout_s, c.stall_timeout_s, c.verify_checksums) == (10, 30, False)
    assert c.retry == fastload.RetryConfig() and c.s3 == fastload.S3Options() and dict(c.http_headers) == {}
    documented = re.findall(r"^\| `(\w+)` \| [^|]+\|", README.split("## Configuration")[1].split("## Errors")[0], re.M)
    assert [f.name for f in dataclasses.fields(fastload.LoadConfig)] == documented
    r = fastload.RetryConfig()
    assert (r.max_attempts, r.backoff_base_s, r.backoff_max_s, r.deadline_s, r.max_concurrent_retries) == \
        (8, 0.1, 10, 600, 4)
    s3 = [f.name for f in dataclasses.fields(fastload.S3Options)]
    assert s3 == ["endpoint_url", "region", "profile", "anonymous", "addressing_style", "presign_expiry_s", "session"]
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.chunk_bytes = 1  # type: ignore[misc]
    with pytest.raises(fastload.ConfigError):
        fastload.LoadConfig(max_concurrency=0)


def test_from_env_reads_exactly_the_documented_variables():
    from fastload import config as cfg

    documented = set(re.findall(r"`(FASTLOAD_[A-Z_]+)`", README.split("fastload.config.from_env()")[1][:400]))
    assert documented == set(cfg.ENV_VARS), (documented, set(cfg.ENV_VARS))
    c = cfg.from_env({"FASTLOAD_CHUNK_BYTES": "16MiB", "FASTLOAD_MAX_CONCURRENCY": "3",
                      "FASTLOAD_HOST_BUFFER_BYTES": "32MiB", "FASTLOAD_LOCAL_THREADS": "2",
                      "FASTLOAD_STALL_TIMEOUT_S": "7.5", "FASTLOAD_HTTP_ENGINE": "aiohttp"})
    assert (c.chunk_bytes, c.max_concurrency, c.host_buffer_bytes, c.local_threads, c.stall_timeout_s,
            c.http_engine) == (16 << 20, 3, 32 << 20, 2, 7.5, "aiohttp")
    assert cfg.from_env({}) == fastload.LoadConfig()


def test_error_table_matches_the_hierarchy():
    block = re.search(r"```\nFastloadError\n(.*?)```", README, re.S)
    assert block
    rows = re.findall(r"[├└]── (\w+)\((\w+)\)", block.group(1))
    assert rows
    import builtins

    from fastload import errors

    for name, base in rows:
        cls = getattr(fastload, name)
        assert cls is getattr(errors, name)
        assert issubclass(cls, fastload.FastloadError), name
        assert issubclass(cls, getattr(builtins, base)), f"{name} is not a {base}"
    assert fastload.FastloadError.__bases__ == (Exception,)
    public_errors = {n for n in fastload.__all__ if isinstance(getattr(fastload, n), type)
                     and issubclass(getattr(fastload, n), BaseException)}
    assert public_errors == {n for n, _ in rows} | {"FastloadError"}
    err = fastload.TransferError("boom", url="https://h/x", byte_range=(0, 8), attempts=3)
    assert (err.url, err.byte_range, err.attempts) == ("https://h/x", (0, 8), 3)
    assert isinstance(err, OSError)


def test_cli_help_lists_the_documented_options():
    from fastload.cli import main

    def help_of(argv):
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf), pytest.raises(SystemExit) as exc:
            main(argv + ["--help"])
        assert exc.value.code == 0, argv
        return buf.getvalue()

    documented = {
        (): ["--debug", "--version"],
        ("pull",): ["--to", "--cache-dir", "--revision", "--concurrency", "--chunk-size", "--verify", "--quiet",
                    "--direct-io"],
        ("inspect",): ["--top", "--all", "--json", "--direct-io"],
        ("load",): ["--device", "--dtype", "--trace", "--json", "--direct-io"],
        ("bench",): ["--runs", "--rounds", "--nginx-sendfile", "--quiet-wait", "--work-dir", "--out"],
    }
    # anchored to the README text, so the expectations move with it
    for opt in ("--revision REV", "--concurrency N", "--chunk-size SIZE", "--verify", "--quiet", "--cache-dir DIR",
                "--to ./llama", "[--top N] [--all] [--json]", "[--device D]", "[--dtype T] [--trace out.json]",
                "CLI: `--direct-io`", "fastload --debug",
                "--runs 2 --rounds 3 --nginx-sendfile both --quiet-wait 60 --work-dir benchmarks/work --out"):
        assert opt in README, opt
    missing = {}
    for argv, opts in documented.items():
        text = help_of(list(argv))
        lacking = [o for o in opts if not re.search(rf"(^|[\s\[,]){re.escape(o)}\b", text)]
        if lacking:
            missing[" ".join(argv) or "fastload"] = lacking
    assert not missing, missing
