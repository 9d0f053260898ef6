"""One-process runs of the trainer (a one-process gloo group, no launcher): resume exactness,
--data-dir handling, gradient checkpointing, mixed precision."""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

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


@pytest.mark.parametrize("case", ["missing", "file", "empty", "no_class_dirs", "not_images"])
def test_bad_data_dir_is_a_clear_message(tmp_path, capsys, case):
    root = tmp_path / "data"
    expected = {
        "missing": "does not exist",
        "file": "is not a directory",
        "empty": "no class sub-folders",
        "no_class_dirs": "no class sub-folders",
        "not_images": "no image files",
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
    rc = main(["--data-dir", str(root), "--steps", "1", "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2
    assert expected in err and str(root) in err
    assert "Traceback" not in err


def test_cli_bad_data_dir_exit_code_without_traceback(tmp_path):
    p = subprocess.run([sys.executable, "-m", "vitfast.cli", "train", "--data-dir", str(tmp_path / "nope")],
                       cwd=REPO, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2
    assert "does not exist" in p.stderr and "Traceback" not in p.stderr


def test_image_folder_start_up_opens_no_file(tmp_path, monkeypatch):
    """timm's folder dataset lists files by name: nothing is opened (not even a header) until a
    sample is read, so a broken file costs nothing at start-up (timm skips it when read)."""
    import builtins

    from PIL import Image

    from vitfast.training.data import load_image_folder

    _make_images(tmp_path / "data", n_per_class=3)
    (tmp_path / "data" / "dog" / "broken.jpg").write_text("not a jpeg")
    opened = []
    real_pil, real_open = Image.open, builtins.open
    monkeypatch.setattr(Image, "open", lambda *a, **k: opened.append(a[0]) or real_pil(*a, **k))
    monkeypatch.setattr(builtins, "open", lambda f, *a, **k: opened.append(f) or real_open(f, *a, **k))
    data = load_image_folder(str(tmp_path / "data"), 32, val_fraction=0.25)
    assert not [f for f in opened if str(tmp_path) in str(f)], opened
    assert data.classes == ["cat", "dog"] and len(data.train) + len(data.val) == 7
    x, label = data.val[0]  # reading one does open it
    assert [f for f in opened if str(tmp_path) in str(f)]


def test_transforms_are_timms_from_the_models_data_config():
    """Training: timm's random-resized crop (the model's interpolation), flip, colour jitter, or
    --aa instead of it (timm's rule); evaluation: resize + centre crop by the model's crop_pct; both end in uint8 tensors
    (no ToTensor scaling, no Normalize: FastViT normalises inside its patch embedding)."""
    import timm.data.transforms as tt
    import torchvision.transforms as T
    from PIL import Image

    import vitfast
    from vitfast.cli.train import aug_config, parse_args
    from vitfast.training.augment import data_config, image_transforms

    model = vitfast.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, num_classes=2)
    cfg = data_config(model, 32)
    assert cfg["input_size"] == (3, 32, 32) and cfg["interpolation"] == model.pretrained_cfg["interpolation"]
    assert cfg["crop_pct"] == model.pretrained_cfg["crop_pct"]

    def kinds(tf):
        return [type(t).__name__ for t in tf.transforms]

    train_tf, val_tf = image_transforms(cfg, aug_config(parse_args(["--data-dir", "x"])))
    assert kinds(train_tf) == ["RandomResizedCropAndInterpolation", "RandomHorizontalFlip", "ColorJitter",
                               "MaybePILToTensor"]
    aa_tf, _ = image_transforms(cfg, aug_config(parse_args(["--data-dir", "x", "--aa", "rand-m9-mstd0.5"])))
    assert "RandAugment" in kinds(aa_tf) and "ColorJitter" not in kinds(aa_tf)
    assert not any(isinstance(t, T.Normalize) for t in train_tf.transforms + val_tf.transforms)
    assert isinstance(train_tf.transforms[-1], tt.MaybePILToTensor) and "CenterCrop" in kinds(val_tf)
    no_aug, _ = image_transforms(cfg, aug_config(parse_args(["--data-dir", "x", "--no-aug"])))
    assert "RandomResizedCropAndInterpolation" not in kinds(no_aug) and "ColorJitter" not in kinds(no_aug)
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (20, 14, 3), dtype=np.uint8))
    for tf in (train_tf, val_tf):
        out = tf(img)
        assert out.dtype == torch.uint8 and tuple(out.shape) == (3, 32, 32)


def test_batch_mixup_and_erasing_keep_uint8_and_match_float_mixing():
    """Mixup on the uint8 batch is mixup of the normalised images up to rounding (0.5/255):
    normalisation is affine per channel. Soft targets sum to 1; erasing changes pixels."""
    from vitfast.training.augment import AugConfig, BatchAugment

    mean, std = [0.4, 0.5, 0.6], [0.2, 0.25, 0.3]
    x = torch.randint(0, 256, (4, 3, 16, 16), dtype=torch.uint8)
    y = torch.tensor([0, 1, 2, 1])
    mix = BatchAugment(AugConfig(mixup=0.8), 3, mean, std, torch.device("cpu"), seed=1, rank=0)
    xm, soft = mix(x, y, step=5)
    assert xm.dtype == torch.uint8 and soft.shape == (4, 3) and torch.allclose(soft.sum(1), torch.ones(4))
    lam = soft[0, 0].item()  # label 0 mixed with the reversed batch's label 1 (no smoothing)
    m, s = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)
    norm = lambda t: (t.float() / 255 - m) / s  # noqa: E731
    expect = lam * norm(x) + (1 - lam) * norm(x.flip(0))
    assert (norm(xm) - expect).abs().max() <= 0.5 / 255 / min(std) + 1e-6
    assert torch.equal(mix(x, y, step=5)[0], xm) and not torch.equal(mix(x, y, step=6)[0], xm)  # seeded by step
    erase = BatchAugment(AugConfig(reprob=1.0), 3, mean, std, torch.device("cpu"), seed=1, rank=0)
    xe, ye = erase(x, y, step=0)
    assert xe.dtype == torch.uint8 and torch.equal(ye, y) and (xe != x).any()


def test_image_folder_trains_with_augmentation_and_resumes_exactly(tmp_path, monkeypatch):
    """An image folder through timm with the full augmentation (random-resized crop, flip, colour
    jitter, auto-augment, mixup + cutmix, random erasing): uint8 batches reach FastViT, and a run
    resumed at step 2 with two DataLoader workers repeats the run without workers exactly."""
    from vitfast.cli import train

    _make_images(tmp_path / "data", n_per_class=10)
    seen = []
    real = train._to_input
    monkeypatch.setattr(train, "_to_input", lambda x, *a: seen.append((x.dtype, tuple(x.shape))) or real(x, *a))
    args = TINY + ["--data-dir", str(tmp_path / "data"), "--img-size", "32", "--patch-size", "8", "--batch-size", "4",
                   "--steps", "4", "--aa", "rand-m9-mstd0.5", "--mixup", "0.8", "--cutmix", "1.0", "--reprob", "0.25",
                   "--drop-path", "0.1"]
    full = run_inprocess(args + ["--workers", "0", "--output-dir", str(tmp_path / "full"), "--save-every", "2"])
    assert [h["step"] for h in full.history] == [1, 2, 3, 4]
    assert all(np.isfinite(h["loss"]) for h in full.history)
    assert seen[0] == (torch.uint8, (4, 3, 32, 32))
    model = unwrap(full.model)
    assert model.head.out_features == 2 and model.patch_embed.proj.in_channels == 3
    assert full.evals[-1]["val_acc"] in (0.0, 0.5, 1.0)  # 2 validation images
    ckpt = str(tmp_path / "full" / "checkpoints" / "step_00000002")
    resumed = run_inprocess(args + ["--workers", "2", "--resume", ckpt])
    assert _losses(resumed) == {k: v for k, v in _losses(full).items() if k > 2}


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


def test_no_validation_images_report_no_figures(tmp_path):
    """--val-fraction 0: no validation set; its loss and accuracy are NaN, never a perfect 0.0."""
    _make_images(tmp_path / "data", n_per_class=4)
    args = TINY + ["--data-dir", str(tmp_path / "data"), "--img-size", "32", "--patch-size", "8", "--batch-size", "4",
                   "--steps", "2", "--val-fraction", "0", "--workers", "0"]
    run = run_inprocess(args)
    assert run.evals and all(np.isnan(e["val_loss"]) and np.isnan(e["val_acc"]) for e in run.evals)
