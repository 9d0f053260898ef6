"""`vitfast profile` on the CPU with a tiny config: the trace loads and holds the named ranges,
the tables, the ncu command line, bad options exit 2; on the fused path (backend="kernel" under
the interpreter, as a GPU runs "auto") the profiled step runs the same fused chain as an
unprofiled one and its time still lands in the attention and mlp regions."""

import json
from collections import Counter

import pytest
import torch

import vitfast.modules.block as vblock
from vitfast import cli, profile

TINY = ["--model", "vit_tiny_patch16_224", "--img-size", "32", "--depth", "2", "--batch-size", "2",
        "--warmup", "1", "--steps", "1"]
RANGES = ("patch_embed", "block0.attn", "block0.mlp", "block1.attn", "block1.mlp", "head")
FUSED_OPS = ("layer_norm", "add_layer_norm", "linear_bias_gelu", "bias_scale_residual")
# two chained fused blocks: block0's norm1, then each residual with the norm after it (norm2, the
# next norm1, the final norm) in one add_layer_norm
CHAIN_OF_TWO = {"layer_norm": 1, "add_layer_norm": 4, "linear_bias_gelu": 2}


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_infer_writes_a_loadable_trace_with_the_ranges(tmp_path, capsys):
    trace = tmp_path / "trace.json"
    rc = profile.main(TINY + ["--trace", str(trace), "--json", str(tmp_path / "p.json"), "--ncu"])
    out = capsys.readouterr().out
    assert rc == 0
    events = json.load(open(trace))["traceEvents"]
    names = {e.get("name") for e in events}
    for r in RANGES + (profile.STEP_RANGE,):
        assert r in names, r
    assert "time per region" in out and "top" in out and "self CPU time" in out
    for region in ("patch_embed", "attention", "mlp", "head"):
        assert f"  {region} " in out
    doc = json.loads((tmp_path / "p.json").read_text())
    assert doc["kind"] == "profile" and doc["env"]["label"] == "CPU"
    assert [r["region"] for r in doc["regions"]] == ["patch_embed", "attention", "mlp", "head"]
    assert doc["regions"][1]["calls"] == 2  # two blocks, one step
    shares = [k["share"] for k in doc["kernels"]]
    assert shares == sorted(shares, reverse=True) and 0 < sum(shares) <= 1.0
    assert any(k["name"].startswith("aten::") for k in doc["kernels"])
    # the ncu line re-runs this command under --nvtx-only, without the profiler outputs
    ncu = next(line.strip() for line in out.splitlines() if line.strip().startswith("ncu "))
    assert "--nvtx-include 'block0.attn/'" in ncu and "regex:_attn_fwd" in ncu and "-c 1" in ncu
    assert "vitfast profile --model vit_tiny_patch16_224" in ncu and "--nvtx-only --steps 1" in ncu
    assert "--trace" not in ncu and "--json" not in ncu and " --ncu" not in ncu


def test_train_has_forward_backward_optimizer(tmp_path, capsys):
    rc = profile.main(TINY + ["--mode", "train", "--impl", "timm", "--uint8", "--json", str(tmp_path / "p.json")])
    assert rc == 0
    doc = json.loads((tmp_path / "p.json").read_text())
    assert [r["region"] for r in doc["regions"]] == ["patch_embed", "attention", "mlp", "head", "forward", "backward",
                                                     "optimizer"]
    assert "AdamW" in doc["precision"]


def test_nvtx_only_runs_without_the_profiler(capsys):
    assert profile.main(TINY + ["--nvtx-only"]) == 0
    assert "with NVTX ranges" in capsys.readouterr().out


def _spy_fused_ops(monkeypatch) -> dict:
    """The block's fused op calls, apart by whether a profiler was recording."""
    calls = {False: Counter(), True: Counter()}
    for name in FUSED_OPS:
        def wrapped(*a, _fn=getattr(vblock, name), _name=name, **k):
            calls[torch._C._autograd._profiler_enabled()][_name] += 1
            return _fn(*a, **k)
        monkeypatch.setattr(vblock, name, wrapped)
    return calls


def test_fused_path_is_what_gets_profiled(tmp_path, monkeypatch):
    built, build_model = [], profile.build_model
    monkeypatch.setattr(profile, "build_model",
                        lambda *a, **k: built.append(build_model(*a, **k).set_backend("kernel")) or built[-1])
    calls = _spy_fused_ops(monkeypatch)
    assert profile.main(TINY + ["--json", str(tmp_path / "p.json")]) == 0  # 1 warm-up step, 1 profiled
    assert calls[False] == calls[True] == CHAIN_OF_TWO
    doc = json.loads((tmp_path / "p.json").read_text())
    regions = {r["region"]: r for r in doc["regions"]}
    assert list(regions) == ["patch_embed", "attention", "mlp", "head"]
    for name in ("attention", "mlp"):
        assert regions[name]["calls"] == 2 and regions[name]["us_per_step"] > 0, regions[name]
    model = built[0]  # left as it was: no hook, no label, no NVTX
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    assert not any(vblock.RANGE_LABEL in b.__dict__ for b in model.blocks) and vblock.NVTX is False


def test_annotate_vit_keeps_patched_timm_blocks_fused(monkeypatch):
    timm = pytest.importorskip("timm")
    from vitfast.integrations.timm import patch_timm

    torch.manual_seed(0)
    model = patch_timm(timm.create_model("vit_tiny_patch16_224", img_size=32, depth=2, num_classes=3).eval(),
                       backend="kernel")
    x = torch.randn(2, 3, 32, 32)
    calls = _spy_fused_ops(monkeypatch)
    with torch.no_grad():
        plain = model(x)
        with profile.annotate_vit(model) as ranges:
            assert not any(b._forward_hooks or b._forward_pre_hooks for b in model.blocks)
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
                profiled = model(x)
            assert ranges.stack == []
    assert calls[False] == calls[True] == CHAIN_OF_TWO
    torch.testing.assert_close(profiled, plain, rtol=0, atol=0)
    names = Counter(e.name for e in prof.events())
    assert all(names[r] == 1 for r in RANGES), names


def test_annotate_vit_removes_its_hooks():
    import vitfast

    model = vitfast.create_model("vit_tiny_patch16_224", img_size=32, depth=1, backend="reference")
    with profile.annotate_vit(model) as ranges:
        assert getattr(model.blocks[0], vblock.RANGE_LABEL) == "block0"
        model(torch.randn(1, 3, 32, 32))
        assert ranges.stack == []  # every range opened in the forward was closed
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    assert vblock.RANGE_LABEL not in model.blocks[0].__dict__
    with pytest.raises(ValueError, match="no .blocks"):
        with profile.annotate_vit(torch.nn.Linear(2, 2)):
            pass


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--model", "vit_nope"], "unknown model 'vit_nope'"),
        (["--batch-size", "0"], "--batch-size must be >= 1, got 0"),
        (["--dtype", "int8"], "invalid choice: 'int8'"),
        (["--steps", "0"], "--steps must be >= 1, got 0"),
        (["--mode", "both"], "invalid choice: 'both'"),
    ],
)
def test_bad_options_exit_2(argv, message, capsys):
    assert cli.main(["profile", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and "usage: vitfast profile" in err


@pytest.mark.parametrize(
    "name, base",
    [
        ("_attn_fwd_kernel", "_attn_fwd_kernel"),
        ("void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<64, 128, 64, 4, false, false, "
         "cutlass::bfloat16_t>, false>(pytorch_flash::Flash_fwd_params)", "flash_fwd_kernel"),
        ("fmha_cutlassF_bf16_aligned_64x64_rf_sm80(PyTorchMemEffAttention::AttentionKernel<cutlass::bfloat16_t>::Params)",
         "fmha_cutlassF_bf16_aligned_64x64_rf_sm80"),
    ],
)
def test_kernel_base_name_for_ncu(name, base):
    assert profile.kernel_base_name(name) == base


def _kernel_rows(*names):
    """kernel_table's rows, most device time first."""
    return [{"name": n, "calls": 1, "self_us": 100.0 - i, "share": None} for i, n in enumerate(names)]


@pytest.mark.parametrize(
    "impl, names, fwd, bwd",
    [
        # training: a backward kernel has the most device time; ncu's block0.attn range holds forward kernels only
        ("fastvit", ["_attn_bwd_dkdv_kernel", "gemm", "_attn_bwd_dq_kernel", "_attn_fwd_kernel"],
         "_attn_fwd_kernel", "_attn_bwd_dkdv_kernel"),
        ("timm", ["void pytorch_flash::flash_bwd_dq_dk_dv_loop_seqk_parallel_kernel<T>(P)",
                  "void pytorch_flash::flash_fwd_kernel<T>(P)"], "flash_fwd_kernel",
         "flash_bwd_dq_dk_dv_loop_seqk_parallel_kernel"),
        ("reference", ["fmha_cutlassB_bf16_aligned_64x64_k64_sm80(P)", "fmha_cutlassF_bf16_aligned_64x64_rf_sm80(P)"],
         "fmha_cutlassF_bf16_aligned_64x64_rf_sm80", "fmha_cutlassB_bf16_aligned_64x64_k64_sm80"),
        ("timm", ["cudnn_generated_fort_native_sdpa_sm90_flash_bprop_wgmma_f16_knob_3",
                  "softmax_warp_backward", "cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_7"],
         "cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_7",
         "cudnn_generated_fort_native_sdpa_sm90_flash_bprop_wgmma_f16_knob_3"),
    ],
)
def test_ncu_filters_on_a_forward_attention_kernel(impl, names, fwd, bwd):
    assert profile.ncu_kernels(_kernel_rows(*names), impl) == (fwd, bwd)


def test_ncu_defaults_without_a_profiled_kernel_are_the_implementations_own():
    """A CPU profile lists no device kernel: the filters fall back to each implementation's kernels
    (timm and the reference run SDPA's, never vitfast's _attn_bwd)."""
    assert profile.ncu_kernels([], "fastvit") == ("_attn_fwd", "_attn_bwd")
    for impl in ("timm", "reference"):
        fwd, bwd = profile.ncu_kernels([], impl)
        assert "_attn_bwd" not in bwd and "flash_bwd" in bwd and "bprop" in bwd
        assert fwd == profile.ATTENTION_KERNEL_RE


def test_train_ncu_hint_names_the_implementations_backward_kernels(capsys):
    assert profile.main(TINY + ["--mode", "train", "--impl", "timm", "--ncu"]) == 0
    out = capsys.readouterr().out
    hint = next(line for line in out.splitlines() if "backward kernels:" in line)
    assert "--nvtx-include 'backward/'" in hint and "_attn_bwd" not in hint and "flash_bwd" in hint
    ncu = next(line.strip() for line in out.splitlines() if line.strip().startswith("ncu "))
    assert "--nvtx-include 'block0.attn/'" in ncu and "bwd" not in ncu
