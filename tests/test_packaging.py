"""Packaging and import (issue 18): the sdist builds and installs, `import vitfast` works without
the compiled extension and without torch, one version, the release metadata.

Every check runs in a child process: what is under test is what a fresh interpreter does on
`import vitfast` (this process imported torch and vitfast long ago)."""

from __future__ import annotations

import json
import os
import re
import site
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
PYPROJECT = REPO / "pyproject.toml"

# A finder that makes vitfast._C look absent, as in a source tree nobody built.
BLOCK_EXTENSION = """
import importlib.abc, sys
class _NoExtension(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "vitfast._C":
            raise ModuleNotFoundError("No module named 'vitfast._C'", name=name)
sys.meta_path.insert(0, _NoExtension())
"""


def _pyproject_version() -> str:
    return re.search(r'^version\s*=\s*"([^"]+)"', PYPROJECT.read_text(), re.MULTILINE).group(1)


def _run(code: str, *, env: dict | None = None, cwd=None, args=(), timeout=600) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, *args, "-c", code], capture_output=True, text=True, timeout=timeout,
                          env=env, cwd=cwd)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def _child_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    if not torch.cuda.is_available():
        env["TRITON_INTERPRET"] = "1"  # the Triton kernels on the CPU
    env.update(extra)
    return env


# ------------------------------------------------------------------ 2. without the extension


def test_import_and_fastvit_without_the_extension():
    """No vitfast._C: import works, FastViT's patch embedding runs the reference path (output equal
    to backend="reference") with exactly one warning naming the reason and the fix, the Triton ops
    and the conversions work, a forced kernel raises with the reason."""
    code = BLOCK_EXTENSION + r"""
import warnings
warnings.simplefilter("always")
import vitfast, torch
from vitfast import _ext
from vitfast._dispatch import KernelNotSupported
assert not _ext.status().ok and not _ext.status().built

torch.manual_seed(0)
model = vitfast.create_model("vit_tiny_patch16_224", depth=1, img_size=32, num_classes=5).eval()
ref = vitfast.create_model("vit_tiny_patch16_224", depth=1, img_size=32, num_classes=5, backend="reference").eval()
ref.load_state_dict(model.state_dict())
images = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
with warnings.catch_warnings(record=True) as caught:
    with torch.no_grad():
        out = [model(images), model(images), model(images.float() / 255)]
ext_warnings = [str(w.message) for w in caught if "vitfast._C" in str(w.message)]
assert len(ext_warnings) == 1, [str(w.message) for w in caught]
msg = ext_warnings[0]
assert "not built" in msg and "pip install --no-build-isolation" in msg and torch.__version__ in msg, msg
with torch.no_grad():
    assert torch.equal(out[0], ref(images)) and torch.equal(out[2], ref(images.float() / 255))

# the op itself: auto is the reference, a forced kernel says why not
x = torch.randn(2, 3, 32, 32)
w = torch.randn(8, 3, 16, 16)
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    assert torch.equal(vitfast.ops.patch_embed(x, w), vitfast.ops.patch_embed_ref(x, w))
try:
    vitfast.ops.patch_embed(x, w, backend="kernel")
    raise SystemExit("a forced kernel without the extension did not raise")
except KernelNotSupported as e:
    assert "vitfast._C is not built" in str(e), e
assert not hasattr(torch.ops.vitfast, "patch_embed")

# the Triton ops do not need the extension
device = "cuda" if torch.cuda.is_available() else "cpu"
x = torch.randn(3, 40, device=device)
wn, bn = torch.randn(40, device=device), torch.randn(40, device=device)
got = vitfast.ops.layer_norm(x, wn, bn, backend="kernel")
torch.testing.assert_close(got, vitfast.ops.layer_norm_ref(x, wn, bn), atol=1e-5, rtol=1e-5)
q = torch.randn(1, 2, 17, 16, device=device)
torch.testing.assert_close(vitfast.ops.attention(q, q, q, backend="kernel"), vitfast.ops.attention_ref(q, q, q),
                           atol=1e-4, rtol=1e-4)

# conversions: to timm and back
try:
    import timm  # noqa: F401
except ImportError:
    print("no timm: conversions not checked")
else:
    back = vitfast.from_timm(vitfast.to_timm(model))
    with torch.no_grad():
        assert torch.allclose(back(images), out[0], atol=1e-6)
print("ok")
"""
    assert _run(code, env=_child_env()).stdout.strip().endswith("ok")


def test_info_without_the_extension():
    code = BLOCK_EXTENSION + "from vitfast.cli import main\nraise SystemExit(main(sys.argv[1:]))"
    env = _child_env()
    out = subprocess.run([sys.executable, "-c", code, "info"], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    line = next(ln for ln in out.stdout.splitlines() if ln.startswith("extension"))
    assert line.split()[1:3] == ["not", "built"] and "pip install --no-build-isolation" in line, line
    assert "attention_fwd" in out.stdout  # the Triton ops are registered all the same
    js = subprocess.run([sys.executable, "-c", code, "info", "--json"], capture_output=True, text=True, env=env,
                        timeout=300)
    ext = json.loads(js.stdout)["extension"]
    assert ext["built"] is False and ext["usable"] is False and "patch_embed" not in json.loads(js.stdout)["ops"]


def test_extension_for_another_torch_names_the_torch_to_install():
    """An extension that loads but was built for another torch is not used; the warning and
    `vitfast info` name that torch exactly and how to rebuild."""
    code = r"""
import sys, types, warnings
fake = types.ModuleType("vitfast._C")
fake.torch_version, fake.with_cuda, fake.cuda_version = "2.0.0+cu118", 1, "11.8"
sys.modules["vitfast._C"] = fake
warnings.simplefilter("always")
import torch, vitfast
from vitfast.cli import info
with warnings.catch_warnings(record=True) as caught:
    vitfast.ops.patch_embed(torch.randn(1, 3, 16, 16), torch.randn(4, 3, 16, 16))
msgs = [str(w.message) for w in caught]
assert len(msgs) == 1, msgs
print(msgs[0])
print(info.render(info.collect()))
"""
    out = _run(code, env=_child_env()).stdout
    for text in (out.splitlines()[0], next(ln for ln in out.splitlines() if ln.startswith("extension"))):
        assert f"built for torch 2.0.0+cu118 but torch {torch.__version__} is installed" in text, text
        assert "`pip install torch==2.0.0` from the index of the 2.0.0+cu118 build" in text, text
        assert "pip install --no-build-isolation" in text, text
    assert "extension      not usable" in out


def test_extension_that_fails_to_load_names_the_torch_it_was_built_for():
    """After a torch upgrade the extension usually fails with undefined symbols, before it can say
    which torch it wants: the build record beside it (_build_info.json) says."""
    code = r"""
import importlib.abc, importlib.machinery, sys
class _Broken(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, name, path=None, target=None):
        return importlib.machinery.ModuleSpec(name, self) if name == "vitfast._C" else None
    def create_module(self, spec):
        raise ImportError("vitfast/_C.abi3.so: undefined symbol: _ZN3c104impl3cow11cow_deleterEPv")
    def exec_module(self, module):
        pass
sys.meta_path.insert(0, _Broken())
import vitfast._ext as ext
ext.build_info = lambda directory=None: {"torch": "2.11.0", "cuda": "12.8", "cuda_kernels": True}
st = ext.status()
assert not st.ok and st.built and st.built_for_torch == "2.11.0", st
print(st.message())
try:
    ext.require_extension()
except ImportError as e:
    assert str(e) == st.message()
"""
    msg = _run(code, env=_child_env()).stdout
    assert "built for torch 2.11.0 but torch" in msg and "undefined symbol" in msg, msg
    assert "`pip install torch==2.11.0`" in msg and "--no-build-isolation" in msg, msg


def test_build_info_is_read_beside_the_extension(tmp_path):
    from vitfast import _ext

    assert _ext.build_info(str(tmp_path)) is None
    (tmp_path / _ext.BUILD_INFO).write_text('{"torch": "2.14.1+cu130", "cuda": "13.0", "cuda_kernels": true}')
    assert _ext.build_info(str(tmp_path))["torch"] == "2.14.1+cu130"
    (tmp_path / _ext.BUILD_INFO).write_text("not json")
    assert _ext.build_info(str(tmp_path)) is None


# ------------------------------------------------------------------ 3. import without torch, version, CLI


def test_import_vitfast_does_not_import_torch():
    code = r"""
import sys, vitfast
assert "torch" not in sys.modules, "import vitfast imported torch"
assert "FastViT" in dir(vitfast) and "torch" not in sys.modules
print(vitfast.__version__)
model_cls = vitfast.FastViT  # first use loads it, registering the ops
import torch
assert hasattr(torch.ops.vitfast, "patch_embed") and hasattr(torch.ops.vitfast, "attention_fwd")
assert vitfast.dispatch._TABLE is not None, "the dispatch table must be read before any torch.compile trace"
from vitfast import FastViT, ops, checkpoint, from_timm  # noqa: F401
assert checkpoint.load_checkpoint is vitfast.load_weights
"""
    assert _run(code, env=_child_env()).stdout.split() == [_pyproject_version()]


def test_import_after_torch_loads_everything_at_once():
    """Existing users: `import torch; import vitfast` registers torch.ops.vitfast.* at once."""
    code = r"""
import sys, torch, vitfast
assert "vitfast.models" in sys.modules and "vitfast.integrations.timm" in sys.modules
assert hasattr(torch.ops.vitfast, "patch_embed") and hasattr(torch.ops.vitfast, "layer_norm_fwd")
assert vitfast.dispatch._TABLE is not None
"""
    _run(code, env=_child_env())


def test_submodule_import_registers_the_ops_and_reads_the_dispatch_table():
    code = r"""
import sys
from vitfast.ops import attention  # torch not imported before: vitfast itself loaded lazily
import torch, vitfast.dispatch
assert hasattr(torch.ops.vitfast, "attention_fwd") and hasattr(torch.ops.vitfast, "patch_embed")
assert vitfast.dispatch._TABLE is not None
"""
    _run(code, env=_child_env())


def test_source_checkout_without_site_packages():
    """`python -S` (no site-packages: neither torch nor vitfast's metadata): the CLI's --help and
    --version, and the version read from pyproject.toml."""
    code = (f"import sys; sys.path.insert(0, {str(REPO)!r})\n"
            "import vitfast\nfrom vitfast.cli import main\n"
            "assert main(['--help']) == 0 and main(['--version']) == 0\nprint(vitfast.__version__)")
    out = _run(code, args=("-S",), cwd="/").stdout
    assert "usage: vitfast" in out and out.split()[-1] == _pyproject_version()
    assert f"vitfast {_pyproject_version()}" in out


@pytest.mark.parametrize("args", [["--help"], ["--version"]])
def test_cli_help_and_version_are_fast(args):
    """Under a second, because they do not import torch (6.6 s when they did)."""
    commands = [[sys.executable, "-m", "vitfast", *args]]
    script = Path(sys.executable).with_name("vitfast")
    if script.exists():
        commands.append([str(script), *args])
    for cmd in commands:
        best = float("inf")
        for _ in range(3):
            t0 = time.perf_counter()
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
            best = min(best, time.perf_counter() - t0)
            assert proc.returncode == 0, proc.stderr
        assert best < 1.0, (cmd, best)
        expected = f"vitfast {_pyproject_version()}" if args == ["--version"] else "usage: vitfast"
        assert expected in proc.stdout, proc.stdout


def test_version_is_written_once():
    """In pyproject.toml only; the package reads its metadata."""
    import vitfast

    assert vitfast.__version__ == _pyproject_version()
    version = re.escape(_pyproject_version())
    for path in (REPO / "vitfast").rglob("*.py"):
        assert not re.search(rf"""["']{version}["']""", path.read_text()), f"{path} writes the version"


def test_release_files():
    license_text = (REPO / "LICENSE").read_text()
    assert license_text.startswith("BSD 3-Clause License") and "Copyright (c) 2026, the vitfast authors" in license_text
    assert f"## [{_pyproject_version()}]" in (REPO / "CHANGELOG.md").read_text()
    assert (REPO / "vitfast" / "py.typed").exists()
    text = PYPROJECT.read_text()
    assert re.search(r'^license = "BSD-3-Clause"$', text, re.MULTILINE)
    assert 'Homepage = "https://github.com/vitfast/vitfast"' in text


def test_test_extra_holds_what_the_other_extras_need():
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    project = tomllib.loads(PYPROJECT.read_text())["project"]
    extras = project["optional-dependencies"]
    assert set(extras) >= {"pretrained", "train", "bench", "test"}
    assert "huggingface_hub" in extras["pretrained"]
    assert {"timm>=1.0", "pillow"} <= set(extras["train"])

    def names(reqs):
        return {re.split(r"[<>=!;\[ ]", r, maxsplit=1)[0].lower().replace("_", "-") for r in reqs}

    other = set().union(*(names(v) for k, v in extras.items() if k != "test"))
    assert other <= names(extras["test"]), other - names(extras["test"])
    assert "build" in names(extras["test"])
    assert "setuptools>=77" in tomllib.loads(PYPROJECT.read_text())["build-system"]["requires"]


def test_setup_warns_about_an_isolated_build(tmp_path):
    """A build whose torch comes from an isolated build environment (pip's pip-build-env-*) is
    explained: the extension would load only with that exact torch."""
    overlay = tmp_path / "pip-build-env-test" / "site"
    overlay.mkdir(parents=True)
    (overlay / "torch").symlink_to(Path(torch.__file__).parent)
    env = dict(_child_env(), PYTHONPATH=str(overlay))
    proc = subprocess.run([sys.executable, "setup.py", "--name"], cwd=REPO, capture_output=True, text=True, env=env,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "isolated build environment" in proc.stderr and "pip install --no-build-isolation" in proc.stderr, proc.stderr
    plain = subprocess.run([sys.executable, "setup.py", "--name"], cwd=REPO, capture_output=True, text=True,
                           env=_child_env(), timeout=300)
    assert plain.returncode == 0 and "isolated" not in plain.stderr, plain.stderr[-2000:]


# ------------------------------------------------------------------ 1. the sdist, built and installed


def _pkg_info(sdist: Path) -> str:
    with tarfile.open(sdist) as tar:
        member = next(m for m in tar.getmembers() if m.name.count("/") == 1 and m.name.endswith("/PKG-INFO"))
        return tar.extractfile(member).read().decode()


@pytest.mark.slow
def test_sdist_builds_installs_and_passes_its_self_test(tmp_path):
    """`python -m build --sdist` from this checkout, then `pip install --no-build-isolation
    --no-deps` of that sdist into a fresh virtual environment (pip builds the wheel from the sdist,
    as `python -m build` does after the sdist, and installs it), then `vitfast info --check` there,
    from outside the checkout.

    The fresh environment reuses this one's torch and build tools: created without pip, with a
    .pth file naming this interpreter's site-packages (a path only, so an editable vitfast there
    is not picked up), so nothing is downloaded. To keep it affordable the sdist is built with
    VITFAST_SKIP_CUDA_BUILD=1: only the C++ CPU operators are compiled (about 2 CPU-minutes)."""
    pytest.importorskip("build", reason="the `build` package (in the test extra) makes the sdist")
    dist, venv, outside = tmp_path / "dist", tmp_path / "venv", tmp_path / "elsewhere"
    outside.mkdir()
    env = _child_env(VITFAST_SKIP_CUDA_BUILD="1", MAX_JOBS=os.environ.get("MAX_JOBS", "2"),
                     PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    env.pop("TRITON_INTERPRET", None)  # `vitfast info --check` sets it for its own child

    subprocess.run([sys.executable, "-m", "build", "--sdist", "--no-isolation", "--outdir", str(dist), str(REPO)],
                   check=True, capture_output=True, env=env, timeout=600)
    (sdist,) = dist.glob("vitfast-*.tar.gz")
    with tarfile.open(sdist) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    for needed in ("csrc/patch_embed.h", "csrc/vitfast.cpp", "csrc/cuda/patch_embed.cu", "setup.py", "pyproject.toml",
                   "LICENSE", "README.md", "CHANGELOG.md", "MANIFEST.in", "vitfast/py.typed",
                   "vitfast/data/dispatch_defaults.json", "benchmarks/bench_attention.py", "examples/train.py",
                   "tests/test_packaging.py"):
        assert needed in names, f"{needed} missing from the sdist"
    assert not [n for n in names if n.endswith((".so", ".pyc")) or n.endswith("_build_info.json")]
    meta = _pkg_info(sdist)
    assert "License-Expression: BSD-3-Clause" in meta and "License-File: LICENSE" in meta
    assert "Project-URL: Homepage, https://github.com/vitfast/vitfast" in meta
    for extra in ("pretrained", "train", "bench", "test"):
        assert f"Provides-Extra: {extra}" in meta

    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    vpy = venv / "bin" / "python"
    purelib = subprocess.run([str(vpy), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             check=True, capture_output=True, text=True).stdout.strip()
    parents = [p for p in site.getsitepackages() if os.path.isdir(p)]
    Path(purelib, "_vitfast_test_parent_env.pth").write_text("\n".join(parents) + "\n")
    pip = subprocess.run([str(vpy), "-m", "pip", "--disable-pip-version-check", "install", "--no-build-isolation",
                          "--no-deps", "--ignore-installed", str(sdist)],
                         capture_output=True, text=True, env=env, cwd=outside, timeout=1800)
    assert pip.returncode == 0, pip.stdout[-3000:] + pip.stderr[-3000:]

    check = subprocess.run([str(venv / "bin" / "vitfast"), "info", "--check"], capture_output=True, text=True,
                           env=env, cwd=outside, timeout=900)
    assert check.returncode == 0 and check.stdout.rstrip().endswith(", 0 failed"), check.stdout[-3000:] + check.stderr
    assert any(ln.split()[:3] == ["PASS", "cpu", "patch_embed"] for ln in check.stdout.splitlines()), check.stdout
    facts = json.loads(subprocess.run([str(venv / "bin" / "vitfast"), "info", "--json"], capture_output=True,
                                      text=True, env=env, cwd=outside, check=True, timeout=300).stdout)
    ext = facts["extension"]
    assert ext["usable"] and ext["path"].startswith(purelib), ext  # the installed copy, not the checkout
    assert ext["built_for_torch"] == torch.__version__ and ext["cuda_kernels"] is False  # VITFAST_SKIP_CUDA_BUILD=1
    assert facts["vitfast"] == _pyproject_version()
    record = json.loads(Path(purelib, "vitfast", "_build_info.json").read_text())
    assert record == {"torch": torch.__version__, "cuda": None, "cuda_kernels": False}
    assert Path(purelib, "vitfast", "py.typed").exists()


def test_readme_documents_the_environment_variables():
    """Every VITFAST_* / TRITON_* variable the package reads is in the README's Environment
    variables section, every build switch setup.py reads in Installing."""
    readme = (REPO / "README.md").read_text()

    def section(title):
        return readme.split(f"\n## {title}\n", 1)[1].split("\n## ", 1)[0]

    read = re.compile(r"""(?:environ(?:\.get)?\(|environ\[|getenv\(|_env_flag\()\s*["']([A-Z][A-Z0-9_]+)["']""")
    runtime = {name for path in (REPO / "vitfast").rglob("*.py") for name in read.findall(path.read_text())
               if name.startswith(("VITFAST_", "TRITON_"))}
    build = set(read.findall((REPO / "setup.py").read_text())) - {"CUDA_PATH"}
    assert {"VITFAST_DISPATCH", "TRITON_INTERPRET"} <= runtime and "VITFAST_SKIP_CUDA_BUILD" in build
    missing = {n for n in runtime if f"`{n}" not in section("Environment variables")}
    missing |= {n for n in build if f"`{n}" not in section("Installing")}
    assert not missing, f"not documented in the README: {sorted(missing)}"
