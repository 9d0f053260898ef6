"""Checkpoint loading never runs pickled code, and a checkpoint that does not fit says why.

A malicious checkpoint is one whose unpickling would call ``exec`` (writing a marker file):
every way vitfast reads a file must refuse it with a clear ValueError, and the marker must
not exist afterwards. Mismatched state dicts list every missing, unexpected and mis-shaped
key. Corrupt files give a ValueError naming the file.
"""

from __future__ import annotations

import os
import pickle

import pytest
import torch

import vitfast
from vitfast.models.weights import CheckpointMismatch, load_weights, read_state_dict


class _Evil:
    """Unpickling this runs ``exec``: it writes ``marker``."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('pwned')",))


def _tiny():
    return vitfast.FastViT(img_size=16, patch_size=8, embed_dim=16, depth=1, num_heads=2, num_classes=3)


def _malicious(tmp_path, fmt: str, suffix: str):
    marker = str(tmp_path / f"marker_{fmt}{suffix.replace('.', '_')}")
    path = str(tmp_path / f"evil_{fmt}{suffix}")
    payload = {"state_dict": _tiny().state_dict(), "extra": _Evil(marker)}
    if fmt == "zip":
        torch.save(payload, path)
    elif fmt == "legacy":
        torch.save(payload, path, _use_new_zipfile_serialization=False)
    else:  # a bare pickle stream
        with open(path, "wb") as f:
            pickle.dump(payload, f)
    return path, marker


@pytest.mark.parametrize("fmt", ["zip", "legacy", "raw_pickle"])
@pytest.mark.parametrize("suffix", [".pth", ".pt", ".bin", ".ckpt"])
def test_malicious_pickle_is_refused_and_never_runs(tmp_path, fmt, suffix):
    path, marker = _malicious(tmp_path, fmt, suffix)
    for load in (lambda: read_state_dict(path), lambda: load_weights(_tiny(), path),
                 lambda: load_weights(_tiny(), os.fsencode(path).decode())):
        with pytest.raises(ValueError) as info:
            load()
        msg = str(info.value)
        assert path in msg, msg
        if fmt != "raw_pickle":  # a bare pickle stream is not a torch file at all: any clear refusal will do
            assert "refused to load" in msg and "never runs code" in msg and "exec" in msg, msg
        assert not os.path.exists(marker), f"unpickling ran code ({fmt}, {suffix}): {marker} was written"


def test_the_payload_really_runs_code_when_unpickled(tmp_path):
    """Control: without weights_only the same file does run code (so the test above can fail)."""
    path, marker = _malicious(tmp_path, "zip", ".pth")
    torch.load(path, weights_only=False)
    assert os.path.exists(marker)


# Regression: vitfast/training/checkpoint.py read meta.pt and rng/rank<R>.pt with
# torch.load(weights_only=False), so `vitfast train --resume DIR` ran code pickled into DIR.
@pytest.mark.parametrize("which", ["meta.pt", "rng"])
def test_training_resume_never_runs_pickled_code(tmp_path, which):
    from vitfast.training.checkpoint import CheckpointError, resume_checkpoint as resume
    from vitfast.training.dist import DistEnv

    marker = str(tmp_path / "marker")
    ckpt = tmp_path / "step_00000001"
    (ckpt / "rng").mkdir(parents=True)
    model = _tiny()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    meta = {"step": 1, "scheduler": sched.state_dict(), "scaler": None, "mode": "ddp", "world_size": 1,
            "args": {"lr": 0.1}, "format": 1}
    rng = {"torch": torch.get_rng_state(), "python": __import__("random").getstate()}
    if which == "meta.pt":
        meta["evil"] = _Evil(marker)
    else:
        rng["evil"] = _Evil(marker)
    torch.save(meta, str(ckpt / "meta.pt"))
    torch.save(rng, str(ckpt / "rng" / "rank0.pt"))
    torch.save({"model": model.state_dict(), "optim": opt.state_dict()}, str(ckpt / "state.pt"))
    env = DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), backend="gloo", launched=False)
    with pytest.raises(CheckpointError) as info:
        resume(str(ckpt), model=model, optimizer=opt, scheduler=sched, scaler=None, env=env, mode="ddp")
    assert which in str(info.value) and "refuses to unpickle" in str(info.value), str(info.value)
    assert not os.path.exists(marker), f"resuming from a checkpoint ran code pickled into {which}"


def test_safetensors_round_trip_and_corrupt_file(tmp_path):
    from safetensors.torch import save_file

    m = _tiny()
    path = str(tmp_path / "w.safetensors")
    save_file({k: v.contiguous() for k, v in m.state_dict().items()}, path)
    m2 = load_weights(_tiny(), path)
    for k, v in m.state_dict().items():
        assert torch.equal(m2.state_dict()[k], v), k
    with open(path, "r+b") as f:
        f.truncate(40)
    with pytest.raises(ValueError, match="could not read .*safetensors"):
        read_state_dict(path)


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_corrupt_torch_file_gives_a_clear_error(tmp_path, damage):
    path = str(tmp_path / "w.pth")
    torch.save(_tiny().state_dict(), path)
    if damage == "truncated":
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) // 2)
    else:
        with open(path, "wb") as f:
            f.write(b"\x00\x01garbage" * 10 if damage == "garbage" else b"")
    with pytest.raises(ValueError) as info:
        read_state_dict(path)
    assert path in str(info.value)


def test_wrong_suffix_and_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_state_dict(str(tmp_path / "nope.pth"))
    p = tmp_path / "w.npz"
    p.write_bytes(b"x")
    with pytest.raises(ValueError, match="must end in"):
        read_state_dict(str(p))


def test_non_mapping_and_tensorless_checkpoints(tmp_path):
    p = str(tmp_path / "t.pth")
    torch.save(torch.zeros(3), p)
    with pytest.raises(TypeError, match="mapping"):
        read_state_dict(p)
    torch.save({"epoch": 3, "opt": {"lr": 0.1}}, p)
    with pytest.raises(ValueError, match="holds no tensors"):
        read_state_dict(p)


def test_mismatch_lists_missing_unexpected_and_misshaped_keys(tmp_path):
    m = _tiny()
    sd = dict(m.state_dict())
    del sd["blocks.0.norm1.weight"], sd["head.bias"]
    sd["blocks.0.attn.qkv.weight"] = torch.zeros(5, 16)
    sd["pos_embed"] = torch.zeros(1, 5, 8)  # wrong width: not resampled, reported
    sd["not.a.param"] = torch.zeros(1)
    path = str(tmp_path / "bad.pth")
    torch.save({"model": sd}, path)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises(CheckpointMismatch) as info:
        load_weights(m, path)
    e = info.value
    assert isinstance(e, ValueError)
    assert set(e.missing) == {"blocks.0.norm1.weight", "head.bias"}
    assert e.unexpected == ["not.a.param"]
    assert {k for k, _, _ in e.mismatched} == {"blocks.0.attn.qkv.weight", "pos_embed"}
    msg = str(e)
    for k in ("blocks.0.norm1.weight", "head.bias", "not.a.param", "blocks.0.attn.qkv.weight", "[5, 16]", "[48, 16]",
              path):
        assert k in msg, (k, msg)
    # nothing was half-loaded
    for k, v in m.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_checkpoint_with_non_finite_weights_loads_as_is(tmp_path):
    """Loading does not sanitise values: a NaN weight stays NaN (and shows in the output)."""
    m = _tiny()
    sd = m.state_dict()
    sd["head.bias"][0] = float("nan")
    path = str(tmp_path / "nan.pth")
    torch.save(sd, path)
    m2 = load_weights(_tiny(), path).eval()
    out = m2(torch.randn(1, 3, 16, 16))
    assert out[0, 0].isnan() and out[0, 1:].isfinite().all()


def _fsdp_resume(ckpt, model, opt):
    from vitfast.training.checkpoint import resume_checkpoint as resume
    from vitfast.training.dist import DistEnv

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    meta = {"step": 1, "scheduler": sched.state_dict(), "scaler": None, "mode": "fsdp", "world_size": 1,
            "args": {}, "format": 1}
    torch.save(meta, str(ckpt / "meta.pt"))
    env = DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), backend="gloo", launched=False)
    return resume(str(ckpt), model=model, optimizer=opt, scheduler=sched, scaler=None, env=env, mode="fsdp")


@pytest.mark.parametrize("where", ["metadata", "item", "none"])
def test_fsdp_resume_never_runs_pickled_code(tmp_path, where):
    """torch.distributed.checkpoint unpickles .metadata with plain pickle and non-tensor items with
    weights_only=False: resuming an FSDP checkpoint must refuse a payload in either."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    from vitfast.training.checkpoint import CheckpointError

    marker = str(tmp_path / "marker")
    ckpt = tmp_path / "step_00000001"
    model = _tiny()
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)  # as in training (adds initial_lr)
    model(torch.randn(1, 3, 16, 16)).sum().backward()
    opt.step()
    msd, osd = get_state_dict(model, opt)
    if where == "item":
        osd["param_groups"][0]["lr"] = _Evil(marker)
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(ckpt / "dcp"))
    if where == "metadata":
        with open(ckpt / "dcp" / ".metadata", "rb") as f:
            md = pickle.load(f)
        md.storage_meta = _Evil(marker)
        with open(ckpt / "dcp" / ".metadata", "wb") as f:
            pickle.dump(md, f)
    fresh = _tiny()
    fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=0.5)
    if where == "none":  # control: a clean checkpoint loads
        assert _fsdp_resume(ckpt, fresh, fresh_opt) == 1
        for k, v in model.state_dict().items():
            assert torch.equal(fresh.state_dict()[k], v), k
        assert fresh_opt.param_groups[0]["lr"] == 0.1
        return
    with pytest.raises(CheckpointError) as info:
        _fsdp_resume(ckpt, fresh, fresh_opt)
    assert "refuses to unpickle" in str(info.value), str(info.value)
    assert not os.path.exists(marker), f"resuming an FSDP checkpoint ran code pickled into its {where}"
