"""One-process runs of the trainer (a one-process gloo group, no launcher): resume exactness,
--data-dir handling, gradient checkpointing, mixed precision."""

import os
import subprocess
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(__file__))
from _train_helpers import REPO, TINY, run_inprocess  # noqa: E402

from vitfast.cli.train import main  # noqa: E402
from vitfast.training.dist import unwrap  # noqa: E402

SHORT = TINY + ["--batch-size", "16", "--lr", "3e-3", "--warmup-steps", "2"]


def _losses(res):
    return {h["step"]: h["loss"] for h in res.history}


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_resume_continues_exactly(tmp_path, mode):
    """Stop after 3 steps (the checkpoint a stopped run leaves), resume: steps 4-6 repeat the
    uninterrupted run's losses bit for bit. Drop-path makes the RNG state matter."""
    args = SHORT + ["--steps", "6", "--drop-path", "0.2", "--dist", mode]
    full = run_inprocess(args + ["--output-dir", str(tmp_path / "full"), "--save-every", "3"])
    ckpt = tmp_path / "full" / "checkpoints" / "step_00000003"
    assert (ckpt / "meta.pt").is_file()
    resumed = run_inprocess(args + ["--output-dir", str(tmp_path / "resumed"), "--resume", str(ckpt)])
    assert resumed.start_step == 3
    assert _losses(resumed) == {k: v for k, v in _losses(full).items() if k > 3}
    assert resumed.evals[-1] == full.evals[-1]


def test_resume_auto_picks_the_newest(tmp_path):
    out = str(tmp_path / "run")
    run_inprocess(SHORT + ["--steps", "4", "--save-every", "2", "--output-dir", out])
    more = run_inprocess(SHORT + ["--steps", "6", "--output-dir", out, "--resume", "auto"])
    assert more.start_step == 4 and [h["step"] for h in more.history] == [5, 6]
    assert sorted(os.listdir(os.path.join(out, "checkpoints"))) == ["step_00000004", "step_00000006"]  # keep 2


def test_resume_with_the_other_dist_mode_is_refused(tmp_path, capsys):
    out = str(tmp_path / "run")
    run_inprocess(SHORT + ["--steps", "1", "--output-dir", out])
    rc = main(SHORT + ["--steps", "2", "--dist", "fsdp", "--resume", os.path.join(out, "checkpoints", "step_00000001")])
    err = capsys.readouterr().err
    assert rc == 2 and "saved with --dist ddp" in err and "Traceback" not in err


def _make_images(root, n_per_class=6, size=(20, 14)):
    rng = np.random.default_rng(0)
    from PIL import Image

    for cls in ("cat", "dog"):
        os.makedirs(root / cls, exist_ok=True)
        for i in range(n_per_class):
            arr = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
            Image.fromarray(arr).save(root / cls / f"{i}.png")


@pytest.mark.parametrize("case", ["missing", "file", "empty", "no_class_dirs", "not_images", "corrupt"])
def test_bad_data_dir_is_a_clear_message(tmp_path, capsys, case):
    root = tmp_path / "data"
    expected = {
        "missing": "does not exist",
        "file": "is not a directory",
        "empty": "no class sub-folders",
        "no_class_dirs": "no class sub-folders",
        "not_images": "no image files",
        "corrupt": "not readable images",
    }[case]
    if case == "file":
        root.write_text("x")
    elif case != "missing":
        root.mkdir()
    if case == "no_class_dirs":
        (root / "a.png").write_bytes(b"")
    if case == "not_images":
        (root / "cat").mkdir()
        (root / "cat" / "notes.txt").write_text("hello")
    if case == "corrupt":
        _make_images(root, n_per_class=2)
        (root / "dog" / "broken.jpg").write_text("not a jpeg")
    rc = main(["--data-dir", str(root), "--steps", "1", "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2
    assert expected in err and str(root) in err
    assert "Traceback" not in err
    if case == "corrupt":
        assert "broken.jpg" in err


def test_cli_bad_data_dir_exit_code_without_traceback(tmp_path):
    p = subprocess.run([sys.executable, "-m", "vitfast.cli", "train", "--data-dir", str(tmp_path / "nope")],
                       cwd=REPO, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2
    assert "does not exist" in p.stderr and "Traceback" not in p.stderr


def test_image_folder_trains(tmp_path):
    """An ImageFolder of odd-sized RGB images: resized/cropped to uint8 3x32x32, 2 classes, split 10%."""
    _make_images(tmp_path / "data", n_per_class=10)
    res = run_inprocess(TINY + ["--data-dir", str(tmp_path / "data"), "--img-size", "32", "--patch-size", "8",
                                "--batch-size", "4", "--steps", "3", "--workers", "0"])
    assert [h["step"] for h in res.history] == [1, 2, 3]
    assert all(np.isfinite(h["loss"]) for h in res.history)
    model = unwrap(res.model)
    assert model.head.out_features == 2 and model.patch_embed.proj.in_channels == 3
    assert res.evals[-1]["val_acc"] in (0.0, 0.5, 1.0)  # 2 validation images


def test_grad_checkpointing_gives_the_same_losses():
    args = SHORT + ["--steps", "3"]
    plain = _losses(run_inprocess(args))
    ckpt = _losses(run_inprocess(args + ["--grad-checkpointing"]))
    assert ckpt == pytest.approx(plain, rel=1e-6)


@pytest.mark.parametrize("mode,backend", [
    ("ddp", "reference"),
    ("ddp", "vitfast"),
    ("fsdp", "vitfast"),
])
@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_mixed_precision_tracks_float32(mode, backend, amp):
    """autocast (DDP) / FSDP2's MixedPrecisionPolicy (FSDP), fp16 through a grad scaler: the
    first steps' losses stay near float32's."""
    args = SHORT + ["--steps", "3", "--dist", mode, "--backend", backend]
    ref = _losses(run_inprocess(args))
    low = _losses(run_inprocess(args + ["--amp", amp]))
    assert low == pytest.approx(ref, rel=2e-3)
    assert low != ref  # it really ran in low precision


def test_timm_model_patched_by_vitfast_trains_like_timm():
    pytest.importorskip("timm")
    patch = pytest.importorskip("vitfast.integrations.timm")
    args = SHORT + ["--model", "timm:vit_tiny_patch16_224", "--steps", "3"]
    fast = run_inprocess(args + ["--backend", "vitfast"])
    ref = run_inprocess(args + ["--backend", "reference"])
    assert patch.is_patched(unwrap(fast.model)) and not patch.is_patched(unwrap(ref.model))
    assert _losses(fast) == pytest.approx(_losses(ref), rel=1e-4)
