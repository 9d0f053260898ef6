"""The GPU-only code paths, checked without a GPU where possible.

Under TRITON_INTERPRET=1 (every CPU test) the kernels are interpreted and the ops are
``custom_op``s, so neither the Triton compiler nor ``triton_op`` ever sees them. These tests
import vitfast in a child process with the interpreter off and (1) check what ``triton_op``
registration records, (2) compile the kernels for sm_90 (H100) with the configs the
launchers pick, failing on compile errors and on shared memory over the H100's per-block
limit. The ``cuda`` tests run the paths that need a device: Inductor autotuning through
``prune_configs_by`` and autotuned kernels under CUDA-graph capture.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent
H100_SMEM_PER_BLOCK = 227 * 1024
_OPS = ["attention_fwd", "attention_bwd", "attention_packed_fwd", "attention_packed_bwd", "add_layer_norm_fwd",
        "add_layer_norm_bwd", "layer_norm_fwd", "layer_norm_bwd", "bias_gelu_fwd", "bias_gelu_bwd",
        "bias_scale_residual_fwd", "bias_scale_residual_bwd", "patch_embed_fused", "patch_embed_fused_backward"]


def _run_compiled(args: list[str], timeout: int = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    env = {**{k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}, **(env or {})}
    return subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True, timeout=timeout)


def _nvidia_backend() -> bool:
    try:
        from triton.backends import backends
    except ImportError:
        return False
    return "nvidia" in backends


def test_triton_ops_name_their_kernels():
    """Each triton_op lists its kernels in torch.library's table (AOTAutograd's cache keys on
    their source); the AST scan triton_op does itself finds none of ours."""
    code = f"""
import json, torch, vitfast
from torch._library import triton as lt
table = getattr(lt, "triton_ops_to_kernels", None)
out = {{}}
for op in {_OPS!r}:
    assert torch.ops.vitfast.__getattr__(op) is not None
    out[op] = None if table is None else [getattr(k, "__name__", None) or k.fn.__name__ for k in table.get("vitfast::" + op, [])]
print(json.dumps(out))
"""
    res = _run_compiled(["-c", code], timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    names = json.loads(res.stdout.strip().splitlines()[-1])
    if all(v is None for v in names.values()):
        pytest.skip("this torch has no triton_ops_to_kernels table")
    assert names["attention_fwd"] == ["_attn_fwd_kernel", "_attn_fwd_tma_kernel", "_attn_fwd_tma_persistent_kernel"]
    assert names["attention_packed_bwd"] == ["_bwd_preprocess_kernel", "_attn_bwd_dkdv_kernel", "_attn_bwd_dq_kernel",
                                             "_attn_bwd_fused_kernel", "_attn_bwd_tma_kernel"]
    assert names["add_layer_norm_bwd"] == ["_ln_bwd_kernel"] and names["bias_gelu_fwd"] == ["_bias_gelu_fwd_kernel"]
    assert all(names[op] for op in _OPS), names


def _tritons() -> list:
    """The triton of this environment, and the GPU image's (``make sm90-compile`` installs it in
    .venv/triton-<version>) where present."""
    found = [pytest.param(None, id="installed")]
    venv = Path(sys.prefix)
    for path in sorted(venv.glob("triton-*")):
        if (path / "triton").is_dir():
            found.append(pytest.param(str(path), id=path.name))
    return found


def _sm90_cases() -> list[str]:
    """Every case the ops declare (OpSpec.sm90): among them fp32 at a wide C and at D = 128, where
    the first attention config once needed 360,960 bytes of shared memory and failed to launch."""
    from vitfast.ops.spec import SPECS

    return list(dict.fromkeys(case for spec in SPECS.values() for case in spec.sm90))

TMA_KERNELS = {"_attn_fwd_tma_kernel", "_attn_fwd_tma_persistent_kernel"}
TMA_BWD_KERNELS = {"_attn_fwd_kernel", "_bwd_preprocess_kernel", "_attn_bwd_tma_kernel"}  # what a tma_bwd case launches
KERNELS = {"attention": {"_attn_fwd_kernel", "_bwd_preprocess_kernel", "_attn_bwd_dkdv_kernel", "_attn_bwd_dq_kernel",
                         "_attn_bwd_fused_kernel"},
           "fused": {"_ln_fwd_kernel", "_ln_bwd_kernel", "_bias_gelu_fwd_kernel", "_bias_gelu_bwd_kernel",
                     "_bias_scale_residual_fwd_kernel", "_bias_scale_residual_bwd_kernel"},
           "patch_embed": {"_pe_fwd_kernel", "_pe_dw_kernel", "_pe_dtok_kernel", "_pe_dx_kernel"}}


@pytest.mark.skipif(not _nvidia_backend(), reason="triton without its NVIDIA backend")
@pytest.mark.parametrize("triton_path", _tritons())
def test_kernels_compile_for_sm90(triton_path):
    """Every kernel the ops launch compiles for sm_90 with the specialisation the JIT gives their
    real arguments (16-byte divisibility of pointers and strides), in every config the
    autotuner may pick, within the H100's shared memory. Registers, spills and shared memory of
    each are printed (``make sm90-compile`` for the tables)."""
    env = {"PYTHONPATH": triton_path} if triton_path else {}
    cases = _sm90_cases()
    assert {c.split(":")[0] for c in cases} == set(KERNELS), cases
    # (1200 s: with the patch embedding's cases the compiles took over 600 s on a loaded 2-core host)
    res = _run_compiled([str(HERE / "_sm90_compile.py"), "--both", *cases], timeout=1200, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = [json.loads(line) for line in res.stdout.splitlines() if line.startswith("{")]
    print("\n".join(line for line in res.stdout.splitlines() if not line.startswith("{")))  # the table
    for case in cases:
        kernels = {r["kernel"] for r in rows if r["spec"] == case}
        no_image_grad = {"_pe_dx_kernel"} if case.startswith("patch_embed:") and ":uint8:" in case else set()
        assert kernels == KERNELS[case.split(":")[0]] - no_image_grad, (case, kernels)
    for r in rows:
        assert r["error"] is None, r
        assert r["shared"] <= H100_SMEM_PER_BLOCK, r
        assert r["registers"] and r["registers"] <= 255, r
        assert r["divisible_16"], f"no 16-byte divisibility hint reached the compiler: {r}"
    fwd = [r for r in rows if r["kernel"] == "_attn_fwd_kernel" and r["spec"].startswith("attention:bfloat16")]
    assert len(fwd) > 1, "only one forward config compiled: the autotuner's survivors were not all checked"
    pipelined = [r for r in fwd if "num_stages=1" not in r["config"]]
    assert pipelined and all(r["cp_async"] or r["tma"] for r in pipelined), \
        "pipelined forward configs without asynchronous copies: the real specialisation did not reach the compiler"
    # 16-bit attention at every head dim, D = 72 and 88 (strides multiples of 8, not 16) included:
    # every kernel that loops over tiles is pipelined and spills nothing (the rounded strides and the
    # two column chunks; before them D = 72/88 compiled to scalar, unpipelined loads at 255 registers)
    half = [r for r in rows if r["spec"].startswith(("attention:bfloat16", "attention:float16"))
            and r["kernel"] != "_bwd_preprocess_kernel"]
    assert {r["spec"].split(":")[2] for r in half} >= {"64", "72", "80", "88"}
    for r in half:
        assert r["cp_async"] or r["tma"], f"unpipelined: {r}"
        assert (r["spill_stores"] or 0) + (r["spill_loads"] or 0) == 0, f"spills: {r}"
    _check_patch_embed_rows([r for r in rows if r["spec"].startswith("patch_embed:")])


def _check_patch_embed_rows(pe: list[dict]) -> None:
    """The fused patch embedding: nothing spilled; every matmul kernel on the tensor cores with wgmma
    (the backward tiles, and every forward config with BLOCK_M >= 64); 16-byte pixel loads. Where
    TMA can read the weight (16-bit rows of 16*16*3*2 bytes, not p = 14's 1176), each forward tile
    is compiled twice, W_TMA=False (pointer loads, no TMA) and W_TMA=True (TMA copies), and so is
    the image gradient kernel (by TMA as launched there, by pointer loads after set_weight_tma(False))."""
    assert {r["kernel"] for r in pe} == KERNELS["patch_embed"]
    for r in pe:
        assert (r["spill_stores"] or 0) + (r["spill_loads"] or 0) == 0, f"spills: {r}"
        block_m = int(m.group(1)) if (m := re.search(r"BLOCK_M=(\d+)", r["config"])) else 64
        if r["kernel"] != "_pe_dtok_kernel" and block_m >= 64:
            assert r["wgmma"], f"no wgmma: {r}"
        if r["kernel"] == "_pe_fwd_kernel":
            assert r["ld_global_v4"] and (r["cp_async"] or r["tma"]), f"no 16-byte or asynchronous loads: {r}"
        if "W_TMA=True" in r["config"]:
            assert r["tma"] > 0, f"the weight's TMA path has no TMA copies: {r}"
        else:
            assert r["tma"] == 0, f"TMA copies in a pointer path: {r}"
    for spec in {r["spec"] for r in pe}:
        _, dt, _, D, _, p = spec.split(":")
        readable = 3 * int(p) ** 2 * getattr(torch, dt).itemsize % 16 == 0
        fwd = [r["config"] for r in pe if r["spec"] == spec and r["kernel"] == "_pe_fwd_kernel"]
        tma = [c for c in fwd if "W_TMA=True" in c]
        assert sorted(c.replace("W_TMA=True", "W_TMA=False") for c in tma) == (
            sorted(c for c in fwd if c not in tma) if readable else []), (spec, fwd)
        dx = {"W_TMA=True" in r["config"] for r in pe if r["spec"] == spec and r["kernel"] == "_pe_dx_kernel"}
        assert dx in (set(), {True, False} if readable else {False}), (spec, dx)


def _check_tma_rows(rows: list[dict]) -> None:
    """The TMA forwards as compiled for sm_90: every copy a TMA copy, wgmma wherever a tile has 64
    rows or more, warp-specialised configs really specialised (more threads than num_warps: the
    producer warps), within the shared memory one block may have, spills of a few bytes at most."""
    assert rows, "no TMA forward compiled"
    for r in rows:
        assert r["error"] is None, r
        assert r["shared"] <= H100_SMEM_PER_BLOCK, r
        if ":float32:" not in r["spec"]:  # fp32 (3xTF32 dots) spills, as in the pointer kernel
            assert (r["spill_stores"] or 0) + (r["spill_loads"] or 0) <= 8, f"spills: {r}"
        assert r["tma"] > 0 and r["cp_async"] == 0, f"not TMA: {r}"
        cfg = dict(kv.split("=") for kv in r["config"].split(","))
        if int(cfg["BLOCK_M"]) >= 64:
            assert r["wgmma"] > 0, f"no wgmma: {r}"
        if cfg.get("WARP_SPEC") == "True":
            assert r["threads"] > 32 * int(cfg["num_warps"]), f"not warp-specialised: {r}"
        assert r["blocks_per_sm"] >= 1, r
        if "PER_SM" in cfg:  # the persistent grid assumes this many programs resident per SM
            assert r["blocks_per_sm"] >= int(cfg["PER_SM"]), r


# The TMA backwards ("tma", "tma_atomic") at every head dim they take in 16-bit (D = 72 and 88: token
# strides multiples of 16 bytes, not of 16 elements) at a ViT length, and a long sequence.
TMA_BWD_CASES = [f"attention_tma_bwd:bfloat16:{D}:197" for D in (64, 72, 80, 88, 128)] + [
    "attention_tma_bwd:float16:64:4096", "attention_tma_bwd:float16:80:257"]


@pytest.mark.skipif(not _nvidia_backend(), reason="triton without its NVIDIA backend")
@pytest.mark.parametrize("triton_path", _tritons())
def test_tma_backwards_compile_for_sm90(triton_path):
    """Every config of both TMA backwards compiles for sm_90 with the JIT's specialisation: K, V,
    Q and dO by TMA (the pointer loads left are lse, delta and the dQ scratch), wgmma wherever the
    owned key tile has 64 rows or more, no spills, within one block's shared memory."""
    env = {"PYTHONPATH": triton_path} if triton_path else {}
    res = _run_compiled([str(HERE / "_sm90_compile.py"), "--both", *TMA_BWD_CASES], env=env, timeout=1200)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = [json.loads(line) for line in res.stdout.splitlines() if line.startswith("{")]
    print("\n".join(line for line in res.stdout.splitlines() if not line.startswith("{")))
    for case in TMA_BWD_CASES:
        assert {r["kernel"] for r in rows if r["spec"] == case} == TMA_BWD_KERNELS, case
    bwd = [r for r in rows if r["kernel"] == "_attn_bwd_tma_kernel"]
    assert any("ATOMIC" in r["config"] for r in bwd) and any("ATOMIC" not in r["config"] for r in bwd)
    for r in bwd:
        assert r["error"] is None, r
        assert r["shared"] <= H100_SMEM_PER_BLOCK and r["blocks_per_sm"] >= 1, r
        assert (r["spill_stores"] or 0) + (r["spill_loads"] or 0) == 0, f"spills: {r}"
        assert r["tma"] > 0, f"not TMA: {r}"
        cfg = dict(kv.split("=") for kv in r["config"].replace("ATOMIC,", "").split(","))
        if int(cfg["BLOCK_N"]) >= 64:
            assert r["wgmma"] > 0, f"no wgmma: {r}"


# The patch embedding's declared cases and fp32 weights (3xTF32 dots). Not ViT-L/14 in 16-bit
# (p = 14, K = 588: TMA cannot read the weight): its pointer forward configs spill 336-476 bytes at
# 255 registers (triton 3.8), before the weight's TMA path as after; the spill check would fail.
PE_CASES = ["patch_embed:bfloat16:uint8:768:224:16", "patch_embed:bfloat16:bfloat16:768:224:16",
            "patch_embed:float32:float32:768:224:16"]


@pytest.mark.skipif(not _nvidia_backend(), reason="triton without its NVIDIA backend")
@pytest.mark.parametrize("triton_path", _tritons())
def test_patch_embed_compiles_for_sm90(triton_path):
    """The fused patch embedding alone (see _check_patch_embed_rows): both weight paths of every
    forward config, the image gradient by TMA and by pointer loads. About 5 min per Triton on a
    loaded 2-core host; the table is printed (registers, spills, shared memory, blocks/SM)."""
    env = {"PYTHONPATH": triton_path} if triton_path else {}
    res = _run_compiled([str(HERE / "_sm90_compile.py"), "--both", *PE_CASES], timeout=1500, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = [json.loads(line) for line in res.stdout.splitlines() if line.startswith("{")]
    print("\n".join(line for line in res.stdout.splitlines() if not line.startswith("{")))
    assert {r["spec"] for r in rows} == set(PE_CASES)
    for r in rows:
        assert r["error"] is None, r
        assert r["shared"] <= H100_SMEM_PER_BLOCK, r
        assert r["registers"] and r["registers"] <= 255 and r["blocks_per_sm"] >= 1, r
    _check_patch_embed_rows(rows)


# Every head dim the TMA forwards take in 16-bit, at a ViT length and a long one (N % 16 == 0: another
# specialisation), both layouts; and fp32 (3xTF32 dots: spills allowed, as in the pointer kernel).
TMA_CASES = [f"attention_fwd:{dt}:{D}:{N}" for dt in ("float16", "bfloat16") for D in (64, 72, 80, 88, 128)
             for N in (197, 4096)] + ["attention_fwd:float32:64:197", "attention_fwd:float32:128:197"]


@pytest.mark.slow
@pytest.mark.skipif(not _nvidia_backend(), reason="triton without its NVIDIA backend")
@pytest.mark.parametrize("triton_path", _tritons())
def test_tma_forwards_compile_for_sm90(triton_path):
    """Every config of both TMA forwards at D = 64, 72, 80, 88, 128 in fp16 and bf16, N = 197 and
    4096 (and fp32 at D = 64 and 128), compiled for sm_90 with the JIT's specialisation (see
    _check_tma_rows). About 20 min per Triton on a loaded 2-core host."""
    env = {"PYTHONPATH": triton_path} if triton_path else {}
    res = _run_compiled([str(HERE / "_sm90_compile.py"), "--both", *TMA_CASES], env=env, timeout=3000)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = [json.loads(line) for line in res.stdout.splitlines() if line.startswith("{")]
    print("\n".join(line for line in res.stdout.splitlines() if not line.startswith("{")))
    for case in TMA_CASES:
        assert {r["kernel"] for r in rows if r["spec"] == case} == TMA_KERNELS, case
    _check_tma_rows(rows)


@pytest.mark.skipif(not _nvidia_backend(), reason="triton without its NVIDIA backend")
@pytest.mark.parametrize("triton_path", _tritons())
def test_kernels_compile_with_float64_scalars(triton_path):
    """Under torch.compile, Inductor types the Python floats it passes to user-defined Triton
    kernels (attention's scale, LayerNorm's eps) as fp64. Found on an H200: the attention
    forward then failed to compile ("acc ... re-assigned to fp64 in loop"). Every kernel must
    compile so, and do no fp64 arithmetic (the scalar is cast to fp32 once)."""
    env = {"PYTHONPATH": triton_path} if triton_path else {}
    cases = ["attention:float32:64:50", "attention:bfloat16:80:197", "attention_fwd:bfloat16:80:197",
             "attention_tma_bwd:bfloat16:80:197", "fused:float32:768"]
    res = _run_compiled([str(HERE / "_sm90_compile.py"), "--fp64-scalars", "--first-config", *cases], env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = [json.loads(line) for line in res.stdout.splitlines() if line.startswith("{")]
    assert {r["kernel"] for r in rows} == KERNELS["attention"] | TMA_KERNELS | TMA_BWD_KERNELS | KERNELS["fused"]
    for r in rows:
        assert r["error"] is None, r
        assert r["fp64_math"] == 0, r


# -------------------------------------------------------------------------- GPU
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_compiled_autotuned_attention_cuda(dtype):
    """Inductor runs our autotuners itself (prune_configs_by -> early_config_prune, then its
    own benchmarking); compiled fwd+bwd with autotuning on agrees with eager."""
    from vitfast.ops.triton import attention as kernels
    from vitfast.ops import attention

    previous = kernels.set_autotune(True)
    try:
        torch._dynamo.reset()
        q, k, v = (torch.randn(2, 6, 197, 80, device="cuda", dtype=dtype, requires_grad=True) for _ in range(3))
        dout = torch.randn(2, 6, 197, 80, device="cuda", dtype=dtype)
        fn = lambda q, k, v: attention(q, k, v, backend="triton")  # noqa: E731
        out_e = fn(q, k, v)
        grads_e = torch.autograd.grad(out_e, (q, k, v), dout)
        out_c = torch.compile(fn, fullgraph=True)(q, k, v)
        grads_c = torch.autograd.grad(out_c, (q, k, v), dout)
        tol = dict(rtol=2e-2, atol=2e-2) if dtype == torch.bfloat16 else dict(rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(out_c, out_e, **tol)
        for a, b in zip(grads_c, grads_e):
            torch.testing.assert_close(a, b, **tol)
    finally:
        kernels.set_autotune(previous)


@pytest.mark.cuda
def test_autotuned_attention_and_fused_ops_in_a_cuda_graph_cuda():
    """Autotuning benchmarks cannot run inside a capture: after one eager call (which tunes),
    capturing the same shapes launches the cached configs and replays match eager bitwise."""
    from vitfast.ops.triton import attention as kernels
    from vitfast.ops import add_layer_norm, attention_packed, bias_gelu

    previous = kernels.set_autotune(True)
    try:
        B, N, H, D = 4, 197, 12, 64
        g = torch.Generator(device="cuda").manual_seed(0)
        qkv = torch.randn(B, N, 3 * H * D, device="cuda", dtype=torch.bfloat16, generator=g)
        x = torch.randn(B, N, H * D, device="cuda", dtype=torch.bfloat16, generator=g)
        w, b = torch.rand(H * D, device="cuda") + 0.5, torch.randn(H * D, device="cuda")

        def fn(qkv, x):
            y = attention_packed(qkv, num_heads=H)
            x_out, h = add_layer_norm(x, y, None, w, b)
            return x_out, bias_gelu(h, b.bfloat16())

        with torch.no_grad():
            fn(qkv, x)  # compile + autotune outside the capture
            sq, sx = qkv.clone(), x.clone()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                outs = fn(sq, sx)
            for seed in (1, 2):
                g.manual_seed(seed)
                sq.normal_(generator=g)
                sx.normal_(generator=g)
                graph.replay()
                for got, want in zip(outs, fn(sq.clone(), sx.clone())):
                    assert torch.equal(got, want)
    finally:
        kernels.set_autotune(previous)
