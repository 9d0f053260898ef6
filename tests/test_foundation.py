"""The build, the extension's registrations, and `vitfast info`."""

import json
import os
import subprocess
import sys
from typing import Optional  # noqa: F401  (a string annotation below names it)

import pytest
import torch

import vitfast
from vitfast import _C


def test_extension_built_for_this_torch():
    assert _C.torch_version == torch.__version__


def test_patch_embed_registered_for_cpu():
    assert torch._C._dispatch_has_kernel_for_dispatch_key("vitfast::patch_embed", "CPU")


@pytest.mark.skipif(
    os.environ.get("VITFAST_SKIP_CUDA_BUILD", "0") == "1", reason="built with VITFAST_SKIP_CUDA_BUILD=1: no CUDA kernels"
)
@pytest.mark.skipif(torch.version.cuda is None, reason="torch is a CPU build: the CUDA sources are not compiled")
def test_patch_embed_registered_for_cuda():
    # the build compiles csrc/cuda whenever nvcc and a CUDA torch are present, GPU or not
    assert _C.with_cuda, "vitfast._C was built without its CUDA kernels although torch is a CUDA build"
    assert torch._C._dispatch_has_kernel_for_dispatch_key("vitfast::patch_embed", "CUDA")


def test_missing_extension_is_explained_not_fatal():
    """Without vitfast._C, import works and the reason and fix are at hand (tests/test_packaging.py
    checks the fallback paths)."""
    code = ("import sys; sys.modules['vitfast._C'] = None\nimport torch, vitfast\nfrom vitfast import _ext\n"
            "print(_ext.status().message())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "vitfast._C is not built" in out and "--no-build-isolation" in out


def test_info_tells_the_truth():
    out = subprocess.run(
        [sys.executable, "-m", "vitfast.info", "--json"], capture_output=True, text=True, check=True
    ).stdout
    info = json.loads(out)
    assert info["torch"] == torch.__version__
    assert info["extension"]["cuda_kernels"] == bool(_C.with_cuda)
    keys = info["ops"]["patch_embed"]
    assert "CPU" in keys
    assert ("CUDA" in keys) == bool(_C.with_cuda)
    assert info["cuda_available"] == torch.cuda.is_available()


def test_module_paths_from_before_the_layout_still_work():
    """vitfast.convert, vitfast.patch, vitfast.bench, ... are the moved modules themselves
    (one object: patching either name patches both), and python -m still runs them."""
    import importlib

    from vitfast import _compat

    for old, new in _compat.MOVED.items():
        assert importlib.import_module(old) is importlib.import_module(new), old
    assert vitfast.convert.from_hf is vitfast.from_hf and vitfast.checkpoint.load_checkpoint is vitfast.load_weights
    from vitfast.patch import patch_timm  # noqa: F401  (from-imports through an old name)

    out = subprocess.run([sys.executable, "-m", "vitfast.bench", "kernels", "--help"], capture_output=True,
                         text=True, check=True).stdout
    assert "usage: vitfast bench kernels" in out


def test_cli_usage_and_unknown_command():
    from vitfast.cli import main

    assert main(["--help"]) == 0
    assert main(["no-such-command"]) == 2


@pytest.mark.parametrize("name", ["vit_tiny_patch16_224", "vit_small_patch32_384", "vit_base_patch16_reg4_gap_256"])
def test_fastvit_matches_timm(name):
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    depth = {"vit_tiny_patch16_224": 12}.get(name, 2)
    ref = timm.create_model(name, pretrained=False, depth=depth).eval()
    model = vitfast.create_model(name, depth=depth).eval()
    model.load_state_dict(ref.state_dict(), strict=True)
    x = torch.randn(2, 3, *model.patch_embed.img_size)
    with torch.no_grad():
        expected, got = ref(x), model(x)
    rel = ((got - expected).norm() / expected.norm()).item()
    assert rel <= 1e-5, rel


def test_one_backend_vocabulary_with_the_older_names_kept():
    """auto / kernel / reference on every op and module; triton, kernels and sdpa still mean
    kernel, kernel and reference."""
    from vitfast._dispatch import BACKEND_ALIASES, canonical_backend
    from vitfast.ops import attention, layer_norm, patch_embed

    assert {canonical_backend("x", b) for b in ("auto", "kernel", "reference", *BACKEND_ALIASES)} == {
        "auto", "kernel", "reference"}
    with pytest.raises(ValueError, match=r"backend must be one of \['auto', 'kernel', 'reference'\]"):
        canonical_backend("attention", "cuda")
    q = torch.randn(1, 2, 5, 16)
    torch.testing.assert_close(attention(q, q, q, backend="sdpa"), attention(q, q, q, backend="reference"),
                               rtol=0, atol=0)
    x = torch.randn(3, 8)
    torch.testing.assert_close(layer_norm(x, backend="triton"), layer_norm(x, backend="kernel"), rtol=0, atol=0)
    images, w = torch.randn(1, 3, 8, 8), torch.randn(4, 3, 4, 4)
    torch.testing.assert_close(patch_embed(images, w, backend="kernel"), patch_embed(images, w, backend="reference"))
    model = vitfast.FastViT(img_size=16, patch_size=8, embed_dim=16, depth=1, num_heads=2, backend="kernels")
    assert model.backend == "kernel" and model.set_backend("sdpa").backend == "reference"


class _OnCuda1(torch.Tensor):
    """A CPU tensor that says it lives on cuda:1 (no GPU here): what the device guard reads."""

    @property
    def device(self):
        return torch.device("cuda", 1)


def test_triton_ops_launch_on_their_tensors_device(monkeypatch):
    """Every Triton op's body runs with the current CUDA device set to its tensors' (a Triton launch
    goes to the current device): entered only where the two differ."""
    import contextlib

    from vitfast._dispatch import on_tensors_device

    entered = []

    @contextlib.contextmanager
    def device(d):
        entered.append(d)
        yield

    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "device", device)
    body = on_tensors_device(lambda *args, **kwargs: "ran")
    assert body(torch.empty(1), n=2) == "ran" and entered == []  # CPU tensors: nothing to set
    assert body(3, torch.empty(1)) == "ran" and entered == []
    assert body(3, torch.Tensor._make_subclass(_OnCuda1, torch.empty(1))) == "ran"
    assert entered == [torch.device("cuda", 1)]


@pytest.mark.parametrize("interpreted", [True, False], ids=["custom_op", "triton_op"])
def test_triton_op_registrar_keeps_the_schema(interpreted):
    """The guard wraps the body before registration: the schema is still inferred from the body's
    annotations (strings under `from __future__ import annotations`), for custom_op and triton_op."""
    from vitfast._dispatch import triton_op_registrar

    name = f"vitfast_test::guarded_{'custom' if interpreted else 'triton'}"

    def body(x: "torch.Tensor", scale: "float", y: "Optional[torch.Tensor]" = None) -> "torch.Tensor":
        return x * scale if y is None else x * scale + y

    op = triton_op_registrar(interpreted)(name, mutates_args=())(body)
    op.register_fake(lambda x, scale, y=None: torch.empty_like(x))
    assert str(torch.ops.vitfast_test.__getattr__(name.split("::")[1]).default._schema).endswith(
        "(Tensor x, float scale, Tensor? y=None) -> Tensor")
    x = torch.randn(3)
    torch.testing.assert_close(op(x, 2.0), x * 2)
    torch.library.opcheck(op, (x, 2.0, torch.ones(3)))
