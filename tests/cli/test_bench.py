"""`vitfast bench` on the CPU with a tiny config: exit codes, the table, JSON/CSV/PNG fields,
the FLOP count, `bench kernels` reporting missing microbenchmarks, the README renderer.
No timing thresholds: speed lives in the benchmarks themselves."""

import contextlib
import dataclasses
import csv
import importlib.util
import io
import json
import os
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from vitfast import cli
from vitfast.cli import bench, benchmarking as bu

ROOT = Path(__file__).resolve().parents[2]
# a two-block ViT-Ti at 32x32: 4 patches + class token; one thread keeps it quick on a busy machine
TINY = ["--model", "vit_tiny_patch16_224", "--img-size", "32", "--depth", "2", "--batch-size", "2",
        "--warmup", "1", "--iters", "2", "--threads", "1", "--no-progress"]
E2E_FIELDS = {
    "device", "device_kind", "label", "cpu_threads", "torch", "triton", "vitfast", "date", "command",
    "model", "impl", "compiled", "mode", "dtype", "batch_size", "img_size", "input", "status", "precision",
    "img_per_s", "ms_median", "ms_p20", "ms_p80", "speedup_vs_reference", "flops_per_image", "tflops",
    "peak_tflops", "mfu", "peak_mem_gib", "spread", "spread_noisy", "peak_documented",
}


@pytest.fixture(autouse=True, scope="module")
def quiet_machine():
    """These tests check outputs, not timings: they must not depend on what else the host runs
    (the load guard itself is tested with a load set by the test)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(bu, "machine_load", lambda: 0.0)
        yield mp


@pytest.fixture(autouse=True)
def keep_threads():
    """--threads sets torch's thread count for the process: give the next tests theirs back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """One run in both modes, writing every output (shared by the tests below)."""
    out = tmp_path_factory.mktemp("bench")
    argv = TINY + ["--mode", "both", "--json", str(out / "r.json"), "--csv", str(out / "r.csv"),
                   "--plot", str(out / "r.png")]
    threads = torch.get_num_threads()
    buf = io.StringIO()
    try:
        with contextlib.redirect_stdout(buf):
            rc = bench.main(argv)
    finally:
        torch.set_num_threads(threads)
    return rc, buf.getvalue(), out, argv


def test_exits_0_and_table_names_every_implementation(tiny_run):
    rc, stdout, _, _ = tiny_run
    assert rc == 0, stdout
    table = stdout.split("\n")
    for impl in ("reference", "fastvit", "timm"):
        for mode in ("infer", "train"):
            assert any(impl in line and mode in line and "vit_tiny_patch16_224" in line for line in table), (impl, mode)
    for header in ("img/s", "ms/batch", "spread p20-p80", "speedup vs reference", "TFLOP/s", "peak mem GiB"):
        assert header in stdout
    assert "CPU" in stdout  # CPU figures are labelled CPU
    assert "MFU" not in stdout.split("\n")[1]  # no MFU column on the CPU without a measured or given peak
    assert "No MFU: no peak measured on the CPU (--measure-peak" in stdout


def test_json_rows_have_documented_fields(tiny_run):
    _, _, out, argv = tiny_run
    doc = json.loads((out / "r.json").read_text())
    assert doc["schema"] == bu.SCHEMA and doc["kind"] == "e2e"
    rows = doc["rows"]
    assert {(r["impl"], r["mode"]) for r in rows} == {(i, m) for i in bench.CPU_DEFAULTS["impl"]
                                                     for m in ("infer", "train")}
    for r in rows:
        assert E2E_FIELDS <= set(r), E2E_FIELDS - set(r)
        assert r["status"] == "ok"
        assert r["label"] == "CPU" and r["device_kind"] == "cpu" and r["peak_mem_gib"] is None
        assert r["command"] == "vitfast bench " + " ".join(argv)
        assert r["img_size"] == 32 and r["depth"] == 2 and r["batch_size"] == 2 and r["n_timed"] == 2
        assert r["ms_p20"] <= r["ms_median"] <= r["ms_p80"]
        assert r["img_per_s"] == pytest.approx(2 / (r["ms_median"] * 1e-3))
        assert r["mfu"] is None and r["peak_tflops"] is None and r["peak_documented"] is False
        assert r["spread"] == pytest.approx((r["ms_p80"] - r["ms_p20"]) / r["ms_median"])
        assert r["spread_noisy"] == (r["spread"] > 0.10)
    ref = [r for r in rows if r["impl"] == "reference"]
    assert all(r["speedup_vs_reference"] == 1.0 for r in ref)
    infer, train = ({r["flops_per_image"] for r in rows if r["mode"] == m} for m in ("infer", "train"))
    assert len(infer) == len(train) == 1 and train.pop() < 3 * infer.pop()


def test_same_weights_give_the_reference_outputs(tiny_run):
    """The implementations are timed with one set of weights: in fp32 their outputs must agree."""
    _, _, out, _ = tiny_run
    rows = json.loads((out / "r.json").read_text())["rows"]
    infer = {r["impl"]: r for r in rows if r["mode"] == "infer"}
    assert infer["reference"]["max_rel_err_vs_reference"] == 0.0
    assert infer["fastvit"]["max_rel_err_vs_reference"] < 1e-4
    assert infer["timm"]["max_rel_err_vs_reference"] < 1e-4


def test_csv_and_png(tiny_run):
    _, _, out, _ = tiny_run
    with open(out / "r.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 6 and E2E_FIELDS <= set(rows[0])
    assert (out / "r.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_uint8_input(tmp_path):
    rc = bench.main(TINY + ["--uint8", "--impl", "reference", "fastvit", "timm", "--json", str(tmp_path / "u.json")])
    assert rc == 0
    rows = json.loads((tmp_path / "u.json").read_text())["rows"]
    assert {r["input"] for r in rows} == {"uint8"}
    for r in rows:  # FastViT's fused normalisation and timm's separate pass agree with the reference
        assert r["max_rel_err_vs_reference"] < 1e-4, r["impl"]


def test_mfu_above_100_percent_is_flagged_and_warned(tmp_path, capsys):
    """A peak given far below what the step reaches: MFU > 100% is marked in the table and warned
    about; the JSON keeps the figure and its source."""
    rc = bench.main(TINY + ["--impl", "reference", "--peak-tflops", "1e-9", "--json", str(tmp_path / "m.json")])
    out = capsys.readouterr()
    assert rc == 0
    assert "MFU" in out.out.split("\n")[1] and "(>100%!)" in out.out and "MFU above 100%" in out.out
    assert "warning: MFU above 100% in 1 row(s)" in out.err and "--peak-tflops" in out.err
    doc = json.loads((tmp_path / "m.json").read_text())
    assert doc["peak"] == {"tflops": 1e-9, "source": "given with --peak-tflops", "documented": True}
    assert doc["rows"][0]["mfu"] > 1


def test_device_peak_is_a_documented_large_gemm(monkeypatch):
    """GPU: a bf16 GEMM of 8192^3; CPU: none unless asked for, then a large fp32 GEMM (made small
    here to keep the test quick), the fastest call; the source says which."""
    assert bu.GPU_PEAK_GEMM >= 8192 and bu.CPU_PEAK_GEMM >= 4096
    none = bu.device_peak(torch.device("cpu"))
    assert none["tflops"] is None and not none["documented"]
    monkeypatch.setattr(bu, "CPU_PEAK_GEMM", 256)
    p = bu.device_peak(torch.device("cpu"), measure_cpu=True, iters=2)
    assert p["tflops"] > 0 and p["documented"] and p["source"].startswith("measured 256^3 float32 GEMM")
    assert "fastest of 2" in p["source"]


def test_spread_column_marks_noisy_rows_and_old_cpu_peaks_get_no_mfu():
    """The table shows each row's p20-p80 spread and marks it noisy above 10% of the median. Rows
    from older files: a GPU peak (a large GEMM) keeps its MFU; a CPU one (a 1024^3 GEMM) does not."""
    from vitfast.cli.report import e2e_display_rows, table_notes

    base = dict(model="vit_tiny_patch16_224", impl="fastvit", mode="infer", status="ok", img_per_s=10.0,
                tflops=0.2, mfu=1.74, peak_tflops=0.11)
    steady = dict(base, ms_median=100.0, ms_p20=99.0, ms_p80=104.0, device_kind="cpu")
    shaky = dict(base, ms_median=100.0, ms_p20=90.0, ms_p80=120.0, device_kind="cpu")
    headers, cells = e2e_display_rows([steady, shaky])
    assert "MFU" not in headers
    col = headers.index("spread p20-p80")
    assert [c[col] for c in cells] == ["5.0%", "30.0% noisy"]
    assert any("1 row(s) marked noisy" in n for n in table_notes([steady, shaky], None))
    gpu = dict(steady, device_kind="cuda", mfu=0.42)
    headers, cells = e2e_display_rows([gpu])
    assert cells[0][headers.index("MFU")] == "42.0%"


def test_json_folder_gets_date_and_cpu_in_the_name(tmp_path):
    env = {"device_kind": "cpu", "device": "Some CPU", "date": "2031-02-03T04:05:06+00:00"}
    assert bu.results_path(str(tmp_path) + os.sep, env, "e2e").name == "2031-02-03_cpu_e2e.json"
    (tmp_path / "2031-02-03_cpu_e2e.json").write_text("{}")
    assert bu.results_path(tmp_path, env, "e2e").name == "2031-02-03_cpu_e2e_2.json"
    gpu = {"device_kind": "cuda", "device": "NVIDIA H100 80GB HBM3", "date": "2031-02-03T04:05:06+00:00"}
    assert bu.results_path(tmp_path, gpu, "e2e").name == "2031-02-03_nvidia-h100-80gb-hbm3_e2e.json"


def test_analytic_flops_match_torch_flop_counter():
    """vit_forward_flops is the matmul count torch's FlopCounterMode gives on timm's model
    (attention included: 4·N²·D per block)."""
    import timm
    from torch.utils.flop_counter import FlopCounterMode

    for kw in (dict(img_size=32, depth=2), dict(img_size=48, depth=1, global_pool="avg", class_token=False)):
        model = timm.create_model("vit_tiny_patch16_224", **kw).eval()
        for blk in model.blocks:  # explicit q@k^T and p@v: FlopCounterMode has no rule for the CPU SDPA op
            blk.attn.fused_attn = False
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            model(torch.randn(3, 3, kw["img_size"], kw["img_size"]))
        assert bu.vit_forward_flops(model) * 3 == counter.get_total_flops(), kw


def test_a_failed_implementation_is_reported_not_dropped(monkeypatch, capsys):
    real = bench.build_model

    def broken(name, impl, *a, **k):
        if impl == "fastvit":
            raise RuntimeError("kernel exploded")
        return real(name, impl, *a, **k)

    monkeypatch.setattr(bench, "build_model", broken)
    rc = bench.main(TINY + ["--impl", "reference", "fastvit"])
    out = capsys.readouterr()
    assert rc == 1
    assert "ERROR" in out.out and "fastvit" in out.out
    assert "kernel exploded" in out.err and "failed" in out.err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--model", "vit_tinny_patch16_224"], "unknown model 'vit_tinny_patch16_224' (did you mean vit_tiny_patch16_224"),
        (["--batch-size", "0"], "--batch-size must be >= 1, got 0"),
        (["--dtype", "fp64"], "invalid choice: 'fp64'"),
        (["--mode", "eval"], "invalid choice: 'eval'"),
        (["--iters", "0"], "--iters must be >= 1"),
        (["--img-size", "30"], "not divisible by vit_tiny_patch16_224's patch size 16"),
        (["--impl", "flash"], "invalid choice: 'flash'"),
        (["--device", "tpu"], "--device"),
    ],
)
def test_bad_options_exit_2_with_a_clear_message(argv, message, capsys):
    rc = cli.main(["bench", "--model", "vit_tiny_patch16_224", *argv])
    assert rc == 2
    err = capsys.readouterr().err
    assert message in err and "usage: vitfast bench" in err


def test_python_dash_m_and_help(capsys):
    import subprocess

    proc = subprocess.run([sys.executable, "-m", "vitfast.bench", "--batch-size", "-3"], capture_output=True, text=True)
    assert proc.returncode == 2 and "--batch-size must be >= 1" in proc.stderr
    assert bench.main(["--help"]) == 0
    assert "--uint8" in capsys.readouterr().out


# ------------------------------------------------------------------------ quiet machine, alternation
@pytest.fixture
def busy(monkeypatch):
    """A 1-minute load average of 9.06 on this host's cores plus 7."""
    monkeypatch.setattr(bu, "machine_load", lambda: float((os.cpu_count() or 1) + 7.06))


def test_a_busy_machine_refuses_to_write_results(busy, tmp_path, capsys):
    rc = bench.main(TINY + ["--impl", "reference", "--json", str(tmp_path / "r.json")])
    assert rc == bu.EXIT_NOISY
    err = capsys.readouterr().err
    assert "load average" in err and "--allow-noisy" in err and "no results are written" in err
    assert not (tmp_path / "r.json").exists()


def test_allow_noisy_writes_rows_marked_noisy(busy, tmp_path):
    rc = bench.main(TINY + ["--impl", "reference", "fastvit", "--json", str(tmp_path / "r.json"), "--allow-noisy"])
    assert rc == 0
    doc = json.loads((tmp_path / "r.json").read_text())
    assert doc["env"]["noisy"] is True and doc["env"]["loadavg_1m_start"] > doc["env"]["cores"]
    assert [r["noisy"] for r in doc["rows"]] == [True, True]


def test_a_quiet_machine_writes_rows_marked_not_noisy(tmp_path):
    assert bench.main(TINY + ["--impl", "reference", "--json", str(tmp_path / "r.json")]) == 0
    rows = json.loads((tmp_path / "r.json").read_text())["rows"]
    assert [r["noisy"] for r in rows] == [False]


def test_load_rising_during_the_run_is_caught(monkeypatch, tmp_path):
    """Quiet at the start, busy at the end (beyond this run's own threads): nothing is written."""
    load = {"now": 0.0}
    monkeypatch.setattr(bu, "machine_load", lambda: load["now"])
    real_run = bench.run

    def run_then_busy(*a, **k):
        result = real_run(*a, **k)  # saves its rows along the way (quiet so far)
        load["now"] = 100.0
        return result

    monkeypatch.setattr(bench, "run", run_then_busy)
    rc = bench.main(TINY + ["--impl", "reference", "--json", str(tmp_path / "r.json")])
    assert rc == bu.EXIT_NOISY and not (tmp_path / "r.json").exists()


def test_a_busy_machine_without_output_files_only_warns(busy, capsys):
    assert bench.main(TINY + ["--impl", "reference"]) == 0
    out = capsys.readouterr()
    assert "NOISY" in out.out and "warning: load average" in out.err


@pytest.mark.parametrize("name", ["patch_embed", "fused", "attention", "attention_candidates"])
def test_every_microbenchmark_refuses_on_a_busy_machine(name, busy, tmp_path, capsys):
    import importlib

    mod = importlib.import_module(f"vitfast.cli.kernels.{name}")
    out = tmp_path / "x.json"
    assert mod.main(["--smoke", "--json", str(out)]) == bu.EXIT_NOISY and not out.exists()
    assert "--allow-noisy" in capsys.readouterr().err


def test_time_alternating_interleaves_round_by_round():
    order = []
    steps = {name: (lambda i, name=name: order.append((name, i))) for name in ("a", "b", "c")}
    times = bu.time_alternating(steps, warmup=1, iters=3, device=torch.device("cpu"))
    assert {k: len(v) for k, v in times.items()} == {"a": 3, "b": 3, "c": 3}
    assert order[:3] == [("a", 0), ("b", 0), ("c", 0)]  # warm-up
    rounds = [order[3 + 3 * r: 6 + 3 * r] for r in range(3)]
    assert [[n for n, _ in rnd] for rnd in rounds] == [["a", "b", "c"], ["b", "c", "a"], ["c", "a", "b"]]
    assert all({i for _, i in rnd} == {1 + r} for r, rnd in enumerate(rounds))  # one step index per round


def test_time_alternating_varies_who_follows_whom():
    """Each block of len(steps) rounds rotates one cyclic order (every implementation in every
    position once); later blocks start from a seeded shuffle, so no implementation always runs right
    after the same one (a fixed order biased identical code 2-6% on a CPU)."""
    names = ("a", "b", "c", "d")
    order = []
    steps = {name: (lambda i, name=name: order.append(name)) for name in names}
    bu.time_alternating(steps, warmup=0, iters=12, device=torch.device("cpu"))
    rounds = [order[4 * r: 4 * r + 4] for r in range(12)]
    for block in range(3):
        for pos in range(4):
            assert {rnd[pos] for rnd in rounds[4 * block: 4 * block + 4]} == set(names)
    followers = {(x, y) for rnd in rounds for x, y in zip(rnd, rnd[1:])}
    assert len({y for x, y in followers if x == "a"}) >= 2  # "a" is followed by more than one
    again = []
    steps = {name: (lambda i, name=name: again.append(name)) for name in names}
    bu.time_alternating(steps, warmup=0, iters=12, device=torch.device("cpu"))
    assert again == order  # seeded: the same schedule every run


def test_time_group_records_each_cpu_rows_page_faults():
    """CPU rows carry the median minor page faults of their timed steps: a step that touches a
    fresh 4 MB buffer every time faults >= 900 times (1024 pages), one that reuses a buffer not."""
    import mmap

    kept = bytearray(4 << 20)

    def fresh(i):  # a new anonymous mapping each step: every page is a fault when first written
        m = mmap.mmap(-1, 4 << 20)
        for off in range(0, 4 << 20, 4096):
            m[off] = 1
        m.close()

    def reuse(i):
        for off in range(0, 4 << 20, 4096):
            kept[off] = 1

    group = [dict(impl="fresh"), dict(impl="reuse")]
    steps = {"fresh": fresh, "reuse": reuse}
    bu.time_group(group, lambda name: steps[name], warmup=1, iters=5, device=torch.device("cpu"))
    faults = {r["impl"]: r["page_faults"] for r in group}
    assert faults["fresh"] >= 900 and faults["reuse"] <= 16, faults


def test_steady_cpu_malloc_modes():
    with pytest.raises(ValueError, match="cpu malloc mode"):
        bu.steady_cpu_malloc("jemalloc")
    assert bu.steady_cpu_malloc("default") == bu._cpu_malloc  # "default" changes nothing
    assert bu.env_info(torch.device("cpu"))["cpu_malloc"] == bu._cpu_malloc


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_steady_cpu_malloc_keeps_freed_memory_for_the_next_step():
    """In a fresh process (mallopt is for the rest of the process): a 40 MB tensor made and freed
    step after step faults in all its pages every step under glibc's defaults (blocks over 32 MB
    are always fresh mmap pages), and almost none once the heap is kept (medians over steps: the
    first steps may still grow the heap)."""
    import subprocess

    code = textwrap.dedent("""
        import sys, torch
        from vitfast.cli import benchmarking as bu
        mode = bu.steady_cpu_malloc(sys.argv[1])
        def step():
            torch.ones(10 << 20)  # 40 MB, written once, freed
        faults = []
        for _ in range(15):  # the first steps may still grow the heap
            f0 = bu.minor_page_faults()
            step()
            faults.append(bu.minor_page_faults() - f0)
        print(mode, sorted(faults[5:])[5])  # the median of the last 10
    """)
    out = {}
    for mode in ("default", "steady"):
        res = subprocess.run([sys.executable, "-c", code, mode], capture_output=True, text=True, timeout=300)
        assert res.returncode == 0, res.stderr
        line = res.stdout.strip().splitlines()[-1]
        out[mode] = (line.rsplit(" ", 1)[0], float(line.rsplit(" ", 1)[1]))
    if not out["steady"][0].startswith("steady"):
        pytest.skip(f"not glibc: {out['steady'][0]}")
    assert out["default"][0] == "default" and out["default"][1] >= 5000  # 10240 pages of 4 KB
    assert out["steady"][1] <= 64, out


@pytest.mark.parametrize("timer", ["time_steps", "time_alternating"])
def test_cuda_timing_brackets_the_steps_on_the_timed_devices_stream(timer, monkeypatch):
    """`--device cuda:1` while cuda:0 is current: the steps' work goes to cuda:1's current stream,
    so the events must be recorded there (recorded on cuda:0's they would time nothing), with
    cuda:1 current and synchronized. Stand-ins for torch.cuda's device and stream state
    (tests/_fake_cuda.py) log each event record and where each step's work went."""
    from _fake_cuda import FakeCuda

    cuda = FakeCuda(count=2, current=0).install(monkeypatch)
    device = torch.device("cuda", 1)
    if timer == "time_steps":
        times = {"a": bu.time_steps(lambda i: cuda.work(1), warmup=1, iters=3, device=device)}
    else:
        steps = {name: (lambda i: cuda.work(1)) for name in ("a", "b")}
        times = bu.time_alternating(steps, warmup=1, iters=3, device=device)
    assert all(len(t) == 3 for t in times.values())
    recorded, worked = cuda.logged("record"), cuda.logged("work")
    assert len(recorded) == 2 * 3 * len(times) and set(recorded) == set(worked) == {cuda.default[1]}
    assert cuda.logged("synchronize") == [1, 1] and cuda.current == 0


def test_paired_speedup_is_the_median_of_per_round_ratios():
    # a load spike in rounds 2-3 slows both: the ratio of medians says 1.5x, the rounds say 2x
    times = {"ref": [2.0, 2.0, 20.0, 20.0, 2.0], "fast": [1.0, 1.0, 10.0, 10.0, 1.0]}
    assert bu.paired_speedup(times, "ref", "fast") == 2.0
    assert bu.paired_speedup(times, "ref", "missing") is None
    group = [dict(impl="fast", status="ok"), dict(impl="ref", status="ok")]
    bu.add_paired_speedups(group, times, fast="fast")
    assert group[0] == dict(impl="fast", status="ok", speedup_vs_ref=2.0) and "speedup_vs_fast" not in group[1]


def test_render_readme_leaves_noisy_rows_out(tiny_run, tmp_path):
    rr = _renderer()
    _, _, out, _ = tiny_run
    results = tmp_path / "results"
    results.mkdir()
    doc = json.loads((out / "r.json").read_text())
    noisy = json.loads(json.dumps(doc))
    for r in noisy["rows"]:
        r.update(noisy=True, device="A Noisy CPU")
    noisy["env"].update(device="A Noisy CPU", date="2099-01-01T00:00:00+00:00")
    (results / "2031-01-01_cpu_e2e.json").write_text(json.dumps(doc))
    (results / "2099-01-01_cpu_e2e.json").write_text(json.dumps(noisy))  # newer, but noisy
    readme = tmp_path / "README.md"
    readme.write_text("<!-- bench:begin -->\n<!-- bench:end -->\n")
    assert rr.main(["--results", str(results), "--readme", str(readme)]) == 0
    text = readme.read_text()
    assert "2031-01-01_cpu_e2e.json" in text and "2099-01-01" not in text and "A Noisy CPU" not in text


# ------------------------------------------------------------------------ bench kernels
def test_bench_kernels_runs_the_package_modules(tmp_path, capsys):
    """Without VITFAST_BENCHMARKS_DIR the microbenchmarks are the installed package's modules
    (no checkout needed): the fused epilogues' smoke run, through the CLI (in a child process, which
    sees the real machine load: --allow-noisy)."""
    rc = cli.main(["bench", "kernels", "--only", "fused", "--allow-noisy", "--json", str(tmp_path / "k.json"),
                   "--fused-args=--ops bias_gelu --impls vitfast eager --modes fwd --iters 1 --warmup 0"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "-m vitfast.cli.kernels.fused" in out and "fused        ok (2 rows)" in out
    rows = json.loads((tmp_path / "k.json").read_text())["rows"]
    assert {r["impl"] for r in rows} == {"vitfast", "eager"} and all(r["benchmark"] == "fused" for r in rows)


def test_bench_kernels_runs_what_exists_and_names_what_is_missing(tmp_path, monkeypatch, capsys):
    (tmp_path / "bench_attention.py").write_text(textwrap.dedent("""
        import argparse, json
        p = argparse.ArgumentParser(); p.add_argument("--json"); p.add_argument("--smoke", action="store_true")
        p.add_argument("--marker", type=int)
        a = p.parse_args()
        json.dump([{"op": "attention", "backend": "vitfast", "N": 197, "ms": 1.5, "tflops": 9.0, "smoke": a.smoke,
                    "marker": a.marker}], open(a.json, "w"))
    """))
    monkeypatch.setenv("VITFAST_BENCHMARKS_DIR", str(tmp_path))
    rc = cli.main(["bench", "kernels", "--json", str(tmp_path / "out") + os.sep, "--attention-args=--marker 7"])
    out = capsys.readouterr().out
    assert rc == 1  # a missing baseline is a failure, never silently dropped
    assert "attention    ok (1 rows)" in out
    assert "patch_embed  missing:" in out and "bench_patch_embed.py does not exist" in out
    (written,) = (tmp_path / "out").glob("*_cpu_kernels.json")
    doc = json.loads(written.read_text())
    assert doc["kind"] == "kernels" and doc["benchmarks"]["patch_embed"].startswith("missing")
    (row,) = doc["rows"]
    assert row["benchmark"] == "attention" and row["smoke"] is True and row["tflops"] == 9.0 and row["marker"] == 7
    assert row["device_kind"] == "cpu" and row["command"].startswith("vitfast bench kernels")


def test_bench_kernels_reports_a_crashing_benchmark(tmp_path, monkeypatch, capsys):
    for name in ("attention", "patch_embed"):
        (tmp_path / f"bench_{name}.py").write_text("raise SystemExit(3)\n")
    monkeypatch.setenv("VITFAST_BENCHMARKS_DIR", str(tmp_path))
    assert cli.main(["bench", "kernels", "--only", "patch_embed"]) == 1
    assert "patch_embed  failed: exit code 3" in capsys.readouterr().out


# ------------------------------------------------------------------------ README renderer
def _renderer():
    spec = importlib.util.spec_from_file_location("render_readme", ROOT / "benchmarks" / "render_readme.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_render_readme_cpu_then_gpu(tiny_run, tmp_path):
    rr = _renderer()
    _, _, out, _ = tiny_run
    results = tmp_path / "results"
    results.mkdir()
    cpu_doc = json.loads((out / "r.json").read_text())
    (results / "2031-01-01_cpu_e2e.json").write_text(json.dumps(cpu_doc))
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- bench:begin -->\nold\n<!-- bench:end -->\noutro\n")
    assert rr.main(["--results", str(results), "--readme", str(readme)]) == 0
    text = readme.read_text()
    assert text.startswith("intro\n<!-- bench:begin -->\n") and text.endswith("<!-- bench:end -->\noutro\n")
    assert "No GPU end-to-end run has been recorded yet" in text and "**CPU**" in text and "old" not in text
    for impl in ("reference", "fastvit", "timm"):
        assert f"| {impl} |" in text
    assert (results / rr.PLOT_NAME).read_bytes()[:4] == b"\x89PNG"
    assert rr.main(["--results", str(results), "--readme", str(readme), "--check"]) == 0

    gpu_doc = json.loads(json.dumps(cpu_doc))
    for d in [gpu_doc["env"], *gpu_doc["rows"]]:
        d.update(device="NVIDIA H100 80GB HBM3", device_kind="cuda", label="NVIDIA H100 80GB HBM3")
    for r in gpu_doc["rows"]:
        r["peak_mem_gib"] = 1.25
    (results / "2031-01-02_nvidia-h100-80gb-hbm3_e2e.json").write_text(json.dumps(gpu_doc))
    assert rr.main(["--results", str(results), "--readme", str(readme), "--check"]) == 1  # out of date now
    assert rr.main(["--results", str(results), "--readme", str(readme)]) == 0
    text = readme.read_text()
    assert "No GPU end-to-end run" not in text and "**NVIDIA H100 80GB HBM3**" in text and "| 1.25 |" in text
    assert "Kernel microbenchmarks (`vitfast bench kernels`): no GPU run recorded yet." in text

    # kernel results: attention as vitfast against the fastest SDPA backend, patch embedding's speed-ups
    env = dict(gpu_doc["env"], command="vitfast bench kernels --json x/")
    att = dict(op="attention", B=256, H=12, N=197, D=64, dtype="bfloat16", mode="fwd", status="ok")
    rows = [dict(att, backend="vitfast", ms=1.0, tflops=400.0), dict(att, backend="flash", ms=1.25, tflops=320.0),
            dict(att, backend="math", ms=9.0, tflops=40.0),
            dict(op="patch_embed", impl="vitfast", model="vit_base_patch16_224", batch=256, input="uint8",
                 dtype="bf16", mode="fwd", status="ok", ms=0.5, gbps=900.0, tflops=200.0, speedup_vs_eager=2.5,
                 speedup_vs_compile=1.3, speedup_vs_unfold_linear=1.1, x_roofline_floor=1.2),
            dict(op="patch_embed", impl="eager", model="vit_base_patch16_224", batch=256, input="uint8",
                 dtype="bf16", mode="fwd", status="ok", ms=1.25)]
    (results / "2031-01-02_nvidia-h100-80gb-hbm3_kernels.json").write_text(
        json.dumps({"kind": "kernels", "env": env, "smoke": False, "rows": rows}))
    assert rr.main(["--results", str(results), "--readme", str(readme)]) == 0
    text = readme.read_text()
    assert "### Kernels: attention" in text and "### Kernels: patch_embed" in text
    assert "| 256 | 12 | 197 | 64 | bfloat16 | fwd | 1 | 400 | flash | 320 | 1.25x |" in text
    assert "| vit_base_patch16_224 | 256 | uint8 | bf16 | fwd | 0.5 | 900 | 200 | 2.50x | 1.30x | 1.10x | 1.10x | 1.20x |" in text


def test_render_readme_without_markers_fails_clearly(tmp_path, capsys):
    rr = _renderer()
    readme = tmp_path / "README.md"
    readme.write_text("no markers here\n")
    assert rr.main(["--results", str(tmp_path), "--readme", str(readme)]) == 1
    assert "<!-- bench:begin -->" in capsys.readouterr().err


def test_compile_adds_compiled_rows(tmp_path):
    rc = bench.main(TINY[:] + ["--depth", "1", "--impl", "fastvit", "--compile", "--json", str(tmp_path / "c.json")])
    assert rc == 0
    rows = json.loads((tmp_path / "c.json").read_text())["rows"]
    assert [(r["impl"], r["compiled"]) for r in rows] == [("fastvit", False), ("fastvit", True)]
    assert rows[1]["compile_s"] > 0 and rows[1]["status"] == "ok"
    assert all(r["speedup_vs_reference"] is None for r in rows)  # no reference in this run: no speedup claimed


def test_inference_rows_replay_a_cuda_graph_for_every_implementation(tmp_path, monkeypatch):
    """GPU inference times every implementation (FastViT, reference, timm) replayed from one CUDA
    graph unless --no-cuda-graphs. Here the graph's capture and replay run eagerly on the CPU
    (the wrapper's logic; the capture itself is GPU-only), and the config is made to ask for it."""
    from vitfast import inference

    replays = []

    class EagerGraph(inference.CUDAGraphModule):
        def _capture(self, warmup):
            with torch.no_grad():
                return self.model(self.static_input)

        def _replay(self):
            replays.append(1)
            with torch.no_grad():
                self.static_output.copy_(self.model(self.static_input))

    monkeypatch.setattr(inference, "CUDAGraphModule", EagerGraph)
    real = bench.resolve_config
    monkeypatch.setattr(bench, "resolve_config",
                        lambda args, parser, **kw: dataclasses.replace(real(args, parser, **kw), cuda_graphs=True))
    assert bench.main(TINY + ["--mode", "both", "--json", str(tmp_path / "g.json")]) == 0
    rows = json.loads((tmp_path / "g.json").read_text())["rows"]
    assert {(r["impl"], r["mode"], r["cuda_graph"]) for r in rows} == (
        {(i, "infer", True) for i in bench.CPU_DEFAULTS["impl"]} | {(i, "train", False) for i in bench.CPU_DEFAULTS["impl"]})
    assert all(r["status"] == "ok" for r in rows) and replays
    assert all(r["cuda_graph"] is False for r in json.loads((tmp_path / "g.json").read_text())["rows"]
               if r["mode"] == "train")
    infer = {r["impl"]: r for r in rows if r["mode"] == "infer"}
    assert infer["fastvit"]["max_rel_err_vs_reference"] < 1e-4 and "CUDA graph" in infer["timm"]["precision"]


def test_every_row_records_the_path_each_op_took(tmp_path, monkeypatch):
    """Each row's `dispatch` says which path each vitfast op took, in every mode: a CUDA graph's
    replays run no Python and a compiled step asks the dispatch only while it is traced, so the
    record is open from before the compile and the capture. Here the graph's replay does nothing
    (as a real one, for the dispatch), FastViT asks dispatch.choose before each forward, and
    torch.compile uses the eager backend (the trace is what matters)."""
    import functools

    from vitfast import dispatch, inference

    class ReplayRunsNoPython(inference.CUDAGraphModule):
        def _capture(self, warmup):
            with torch.no_grad():
                for _ in range(warmup):
                    self.model(self.static_input)
                return self.model(self.static_input)

        def _replay(self):
            pass

    def ask(module, args):
        x = args[0]
        dispatch.choose("layer_norm", x.device, x.dtype, dispatch.training_call(x), {"C": 8, "rows": 2})

    real_build, real_config, real_compile = bench.build_model, bench.resolve_config, torch.compile

    def build(name, impl, *args, **kw):
        model = real_build(name, impl, *args, **kw)
        if impl == "fastvit":
            model.register_forward_pre_hook(ask)
        return model

    monkeypatch.setattr(inference, "CUDAGraphModule", ReplayRunsNoPython)
    monkeypatch.setattr(bench, "build_model", build)
    monkeypatch.setattr(bench, "resolve_config",
                        lambda args, parser, **kw: dataclasses.replace(real_config(args, parser, **kw), cuda_graphs=True))
    monkeypatch.setattr(torch, "compile", functools.partial(real_compile, backend="eager"))
    out = tmp_path / "d.json"
    assert bench.main(TINY + ["--depth", "1", "--warmup", "3", "--mode", "both", "--impl", "reference", "fastvit",
                              "--compile", "--json", str(out)]) == 0
    rows = {(r["impl"], r["mode"], r["compiled"]): r for r in json.loads(out.read_text())["rows"]}
    assert len(rows) == 8 and all(r["status"] == "ok" for r in rows.values())
    assert rows[("fastvit", "infer", False)]["cuda_graph"] is True
    for (impl, mode, compiled), row in rows.items():
        assert list(row["dispatch"]) == ([] if impl == "reference" else ["layer_norm:kernel"]), (impl, mode, compiled)
    for mode in ("infer", "train"):  # compiled: counted per trace (the capture's no_grad retraces), not per step
        eager, traced = (rows[("fastvit", mode, c)]["dispatch"]["layer_norm:kernel"] for c in (False, True))
        assert traced < eager, (mode, traced, eager)


def test_cuda_graphs_only_on_a_gpu_and_switched_off_by_the_flag():
    p = bench.build_parser()
    cfg = bench.resolve_config(p.parse_args(TINY), p)
    assert cfg.device.type == "cpu" and cfg.cuda_graphs is False
    assert p.parse_args(TINY + ["--no-cuda-graphs"]).no_cuda_graphs is True


@pytest.mark.cuda
def test_gpu_inference_with_and_without_cuda_graphs(tmp_path):
    argv = ["--model", "vit_tiny_patch16_224", "--img-size", "64", "--depth", "2", "--batch-size", "4", "--warmup", "2",
            "--iters", "3", "--mode", "infer", "--no-progress", "--allow-noisy"]
    for extra, graph in (([], True), (["--no-cuda-graphs"], False)):
        out = tmp_path / f"{graph}.json"
        assert bench.main(argv + extra + ["--json", str(out)]) == 0
        rows = json.loads(out.read_text())["rows"]
        assert all(r["status"] == "ok" and r["cuda_graph"] is graph for r in rows), rows
        assert max(r["max_rel_err_vs_reference"] for r in rows) < 2e-2


def test_fastvit_kernels_forces_the_kernels_for_its_own_steps_only(tmp_path):
    """fastvit_kernels (default on a GPU): the same model with every dispatch choice forced onto
    the kernels while its entry is built and stepped; fastvit beside it keeps the table."""
    from vitfast import dispatch

    assert bench.GPU_DEFAULTS["impl"] == list(bench.IMPLS) and "fastvit_kernels" not in bench.CPU_DEFAULTS["impl"]
    before = dispatch.override()
    rc = bench.main(TINY + ["--mode", "both", "--impl", "reference", "fastvit", "fastvit_kernels", "--json",
                            str(tmp_path / "k.json")])
    assert rc == 0 and dispatch.override() == before  # forced only inside its entry
    rows = {(r["impl"], r["mode"]): r for r in json.loads((tmp_path / "k.json").read_text())["rows"]}
    for mode in ("infer", "train"):
        assert rows[("fastvit_kernels", mode)]["status"] == "ok"
        assert rows[("fastvit_kernels", mode)]["dispatch_mode"] == "kernel"
        assert rows[("fastvit", mode)]["dispatch_mode"] == before
    assert rows[("fastvit_kernels", "infer")]["max_rel_err_vs_reference"] < 1e-4


def test_patch_embed_bench_channels_last_input():
    """uint8_hwc: raw pixels with channels_last strides (decoded [B, H, W, 3] frames permuted), what
    the three-kernel path's de-interleaving kernel serves; in the default inputs on CUDA only."""
    from vitfast.cli.kernels import patch_embed as pb

    x = pb.make_inputs(pb.SMOKE_MODELS["smoke_patch16_32x48"], 2, "uint8_hwc", torch.float32, torch.device("cpu"), 1)
    img = x["images"][0]
    assert img.dtype == torch.uint8 and img.shape == (2, 3, 32, 48)
    assert img.is_contiguous(memory_format=torch.channels_last) and not img.is_contiguous()
    assert "uint8_hwc" in pb.INPUTS and "uint8_hwc" not in pb.CPU_INPUTS
    rows = pb.collect_rows(smoke=True, device="cpu", impls=["vitfast", "eager"], modes=["fwd"], inputs=["uint8_hwc"],
                           warmup=1, iters=2)
    assert {(r["input"], r["status"]) for r in rows} == {("uint8_hwc", "ok")}


# ------------------------------------------------------------------------ peak memory, failures while timed, MFU
def _fake_gpu_entry(monkeypatch, cuda, mem, capture_bytes):
    """What prepare_entry needs to run an inference entry on a faked cuda:0: the model and inputs
    built on the CPU, a CUDA graph whose capture runs eagerly and allocates ``capture_bytes`` (its
    pool: the activations), and allocator statistics kept in ``mem``."""
    from vitfast import inference

    class EagerGraph(inference.CUDAGraphModule):
        def _capture(self, warmup):
            cuda.log.append(("capture", None))
            mem["peak"] = max(mem["peak"], mem["allocated"] + capture_bytes)
            with torch.no_grad():
                return self.model(self.static_input)

        def _replay(self):  # a replay allocates nothing
            with torch.no_grad():
                self.static_output.copy_(self.model(self.static_input))

    def reset(device=None):
        cuda.log.append(("reset_peak", None))
        mem["peak"] = mem["allocated"]

    cpu = torch.device("cpu")
    real_build, real_inputs = bench.build_model, bench.make_inputs
    monkeypatch.setattr(bench, "build_model", lambda name, impl, overrides, device, uint8=False:
                        real_build(name, impl, overrides, cpu, uint8))
    monkeypatch.setattr(bench, "make_inputs", lambda cfg, *a: real_inputs(dataclasses.replace(cfg, device=cpu), *a))
    monkeypatch.setattr(inference, "CUDAGraphModule", EagerGraph)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: mem["allocated"])
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: mem["peak"])
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", reset)


def test_peak_memory_of_a_cuda_graph_row_covers_its_capture(monkeypatch):
    """GPU inference rows replay a CUDA graph: the activations live in the graph's pool, allocated
    while CUDAGraphModule captures (in its constructor); replays allocate nothing. The peak must be
    reset before the capture, or every implementation shows its weights only. Fake CUDA state
    (tests/_fake_cuda.py) and allocator statistics; the capture allocates 1 GiB."""
    import vitfast
    from _fake_cuda import FakeCuda

    cuda = FakeCuda(count=1).install(monkeypatch)
    mem = {"allocated": 3 * 2**30, "peak": 5 * 2**30}  # 3 GiB held by earlier entries, an old peak of 5
    _fake_gpu_entry(monkeypatch, cuda, mem, capture_bytes=2**30)
    cfg = bench.Config(models=["vit_tiny_patch16_224"], batch_size=2, img_size=32, depth=1, dtype=torch.float32,
                       dtype_name="fp32", modes=["infer"], impls=["reference"], compile=False, uint8=False, warmup=1,
                       iters=2, device=torch.device("cuda", 0), check=True, peak_tflops=None, cuda_graphs=True)
    ref = vitfast.create_model("vit_tiny_patch16_224", img_size=32, depth=1, backend="reference")
    weights = {"state": {k: v.detach() for k, v in ref.state_dict().items()}}
    entry = bench.prepare_entry(cfg, "vit_tiny_patch16_224", "reference", False, "infer", weights, {}, lambda: None)
    row = entry.row
    assert row["status"] == "ok" and row["cuda_graph"] is True
    order = [kind for kind, *_ in cuda.log if kind in ("reset_peak", "capture")]
    assert order == ["reset_peak", "capture"], order
    assert row["peak_mem_gib"] == pytest.approx(1.0)  # the capture's pool, less the 3 GiB held before
    assert "CUDA graph warm-up and capture" in row["peak_mem_covers"] and "warm-up step" in row["peak_mem_covers"]


def test_a_step_failing_while_timed_leaves_a_status_row_and_the_others_are_timed(capsys):
    """An out-of-memory error (or any error) in the timed phase, e.g. on a step's second call: that
    entry's row says so and the group's other entries still get their figures (it raised before,
    losing the group's rows and every later model)."""
    from types import SimpleNamespace

    def fails_on_call(n, exc):
        calls = {"n": 0}

        def step(i):
            calls["n"] += 1
            if calls["n"] == n:
                raise exc

        return step

    def entry(impl, step):
        return bench.Entry(dict(impl=impl, compiled=False, status="ok", flops_per_image=1e9), step=step, keep=object())

    entries = {("reference", False): entry("reference", lambda i: None),
               ("fastvit", False): entry("fastvit", fails_on_call(2, torch.cuda.OutOfMemoryError(
                   "CUDA out of memory. Tried to allocate 2.00 GiB"))),
               ("timm", False): entry("timm", fails_on_call(2, RuntimeError("kernel exploded\nmore")))}
    cfg = SimpleNamespace(iters=3, device=torch.device("cpu"), batch_size=2)
    bench.time_group(cfg, entries, {"tflops": None, "source": "none", "documented": False}, lambda: None)
    rows = {k[0]: e.row for k, e in entries.items()}
    assert rows["fastvit"]["status"] == "oom" and "ms_median" not in rows["fastvit"]
    assert rows["timm"]["status"] == "error: RuntimeError: kernel exploded" and "ms_median" not in rows["timm"]
    assert rows["reference"]["status"] == "ok" and rows["reference"]["n_timed"] == 3
    assert rows["reference"]["speedup_vs_reference"] == 1.0
    assert entries[("fastvit", False)].step is None and entries[("fastvit", False)].keep is None  # freed
    assert "kernel exploded" in capsys.readouterr().err  # an error's traceback; an OOM is a size, not a bug


def test_mfu_peak_is_measured_in_the_runs_dtype(monkeypatch, tmp_path):
    """The MFU denominator is a GEMM in the run's dtype (an fp32 run against an fp32 peak, TF32 as
    the process has it; it was bf16 for every run); each row records the peak's dtype."""
    cuda = torch.device("cuda", 0)
    tf32 = torch.backends.cuda.matmul.allow_tf32
    try:
        for allowed in (False, True):
            torch.backends.cuda.matmul.allow_tf32 = allowed
            assert bu.peak_gemm(cuda, dtype=torch.float32)[1:] == (torch.float32, 10, allowed)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    assert bu.peak_gemm(cuda, dtype=torch.bfloat16)[1:] == (torch.bfloat16, 10, None)
    assert bu.peak_gemm(cuda)[1] == torch.bfloat16 and bu.peak_gemm(torch.device("cpu")) is None
    assert bu.peak_gemm(torch.device("cpu"), measure_cpu=True, dtype=torch.bfloat16)[1] == torch.bfloat16
    monkeypatch.setattr(bu, "CPU_PEAK_GEMM", 128)
    assert bench.main(TINY + ["--impl", "reference", "--measure-peak", "--json", str(tmp_path / "p.json")]) == 0
    doc = json.loads((tmp_path / "p.json").read_text())
    assert doc["peak"]["dtype"] == "float32" and "128^3 float32 GEMM" in doc["peak"]["source"]
    (row,) = doc["rows"]
    assert row["peak_dtype"] == "float32" and row["mfu"] is not None


def test_old_gpu_fp32_rows_quoted_against_a_bf16_peak_show_no_mfu():
    from vitfast.cli.report import mfu_shown

    old = dict(device_kind="cuda", dtype="fp32", mfu=0.9, peak_documented=True,
               peak_source="measured 8192^3 bfloat16 GEMM, fastest of 10: 1.4 ms")
    assert mfu_shown(old) is None
    assert mfu_shown(dict(old, dtype="bf16")) == 0.9
    assert mfu_shown(dict(old, peak_dtype="float32")) == 0.9
    assert mfu_shown(dict(old, peak_source="given with --peak-tflops")) == 0.9


# ------------------------------------------------------------------------ bench kernels --device
def _stub_children(monkeypatch):
    """subprocess.run stubbed: each microbenchmark 'runs' by writing one row; returns its calls."""
    import subprocess

    from vitfast.cli import bench_kernels

    seen = []

    def fake_run(cmd, env=None, timeout=None, **_):
        seen.append((cmd, env))
        Path(cmd[cmd.index("--json") + 1]).write_text(json.dumps([{"op": "x", "status": "ok"}]))
        return subprocess.CompletedProcess(cmd, 0)

    monkeypatch.setattr(bench_kernels.subprocess, "run", fake_run)
    return seen


def test_bench_kernels_runs_its_microbenchmarks_on_the_cpu_when_asked(tmp_path, monkeypatch):
    """--device cpu: the children see no GPU (CUDA_VISIBLE_DEVICES=""), so a GPU host cannot run
    them on CUDA under a file that says CPU; the value is recorded."""
    seen = _stub_children(monkeypatch)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    out = tmp_path / "k.json"
    assert cli.main(["bench", "kernels", "--device", "cpu", "--only", "fused", "attention", "--json", str(out)]) == 0
    assert [env["CUDA_VISIBLE_DEVICES"] for _, env in seen] == ["", ""]
    assert all(env["TRITON_INTERPRET"] == "1" for _, env in seen)
    doc = json.loads(out.read_text())
    assert doc["env"]["device_kind"] == "cpu" and doc["env"]["child_cuda_visible_devices"] == ""


@pytest.mark.parametrize("own, expected", [(None, "1"), ("4,6", "6"), ("GPU-aaa,GPU-bbb", "GPU-bbb")])
def test_bench_kernels_runs_its_microbenchmarks_on_cuda_n(own, expected, tmp_path, monkeypatch):
    """--device cuda:1 (a faked two-GPU host): the children get that card as their only one (their
    cuda:0), the N-th of this process's own CUDA_VISIBLE_DEVICES when it has one; before, they ran
    on cuda:0 while the file named cuda:1."""
    from types import SimpleNamespace

    seen = _stub_children(monkeypatch)
    if own is None:
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    else:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", own)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: f"Fake GPU {torch.device(device).index}")
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda device=None: SimpleNamespace(major=9, minor=0, total_memory=2**37))
    out = tmp_path / "k.json"
    assert cli.main(["bench", "kernels", "--device", "cuda:1", "--only", "memory", "--json", str(out)]) == 0
    ((cmd, env),) = seen
    assert env["CUDA_VISIBLE_DEVICES"] == expected and "--smoke" not in cmd
    doc = json.loads(out.read_text())
    assert doc["env"]["device"] == "Fake GPU 1" and doc["env"]["child_cuda_visible_devices"] == expected
    assert cli.main(["bench", "kernels", "--device", "cuda:2", "--only", "memory"]) == 2  # no such card


# ------------------------------------------------------------------------ README: memory, CPU/GPU labels, plot
def test_render_readme_memory_table_and_per_table_devices(tiny_run, tmp_path):
    """Memory rows show their measurement (extra peak, x one N×N, growth) and a failed row its
    error; with a CPU end-to-end run and GPU kernel runs, the CPU line speaks of the end-to-end
    figures only and each kernel table names its card."""
    rr = _renderer()
    _, _, out, _ = tiny_run
    results = tmp_path / "results"
    results.mkdir()
    (results / "2031-01-01_cpu_e2e.json").write_text((out / "r.json").read_text())
    env = dict(device="NVIDIA H200", device_kind="cuda", label="NVIDIA H200", torch="2.11", triton="3.6", vitfast="0.1",
               date="2031-01-02T00:00:00+00:00", command="vitfast bench kernels --json x/")
    base = dict(benchmark="memory", mode="fwd+bwd", B=4, H=16, D=64, dtype="bfloat16")
    rows = [dict(base, impl="vitfast", N=2048, peak_extra_bytes=64 * 2**20, extra_per_nxn=0.125, growth_vs_prev_N=None,
                 status="ok", error=None),
            dict(base, impl="vitfast", N=4096, peak_extra_bytes=128 * 2**20, extra_per_nxn=0.0625, growth_vs_prev_N=2.0,
                 status="ok", error=None),
            dict(base, impl="sdpa_math", N=4096, peak_extra_bytes=None, extra_per_nxn=None, growth_vs_prev_N=None,
                 error="OutOfMemoryError: CUDA out of memory")]  # an older row: no status
    (results / "2031-01-02_nvidia-h200_kernels.json").write_text(
        json.dumps({"kind": "kernels", "env": env, "smoke": False, "rows": rows}))
    readme = tmp_path / "README.md"
    readme.write_text("<!-- bench:begin -->\n<!-- bench:end -->\n")
    assert rr.main(["--results", str(results), "--readme", str(readme)]) == 0
    text = readme.read_text()
    assert "### Kernels: memory\n" in text and "**NVIDIA H200**" in text
    assert "the figures below were measured on a CPU" not in text
    assert "No GPU end-to-end run has been recorded yet: the end-to-end figures below were measured on a CPU" in text
    assert "| extra peak MiB | x one N×N | growth vs previous N | status |" in text
    assert "| vitfast | fwd+bwd | 4 | 16 | 4096 | 64 | bfloat16 | 128.0 | 0.0625 | 2.00x | ok |" in text
    assert "| sdpa_math | fwd+bwd | 4 | 16 | 4096 | 64 | bfloat16 |  |  |  | failed: OutOfMemoryError: CUDA out of memory |" in text


def test_e2e_plot_of_two_cards_shows_each_cards_figure(monkeypatch, tmp_path):
    """Rows from two cards: each card's img/s is drawn (one line of panels per card), not the first
    card's figure under a title naming both."""
    import matplotlib.axes

    from vitfast.cli.report import plot_e2e

    drawn = []
    real_bar = matplotlib.axes.Axes.bar
    monkeypatch.setattr(matplotlib.axes.Axes, "bar",
                        lambda self, xs, ys, *a, **k: drawn.extend(ys) or real_bar(self, xs, ys, *a, **k))
    row = dict(model="vit_base_patch16_224", impl="fastvit", mode="infer", status="ok")
    plot_e2e([dict(row, device="NVIDIA H100", img_per_s=1000.0), dict(row, device="NVIDIA H200", img_per_s=1500.0)],
             tmp_path / "p.png", title="two cards")
    assert sorted(drawn) == [1000.0, 1500.0]
