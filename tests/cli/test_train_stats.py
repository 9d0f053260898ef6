"""`vitfast train`'s per-step statistics stay on the device until the log line: no host-to-device
copy per step (on CUDA a `torch.tensor(..., device=cuda)` is a blocking copy, a sync every step)."""

import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "training"))
from _train_helpers import TINY, run_inprocess  # noqa: E402

TRAIN = os.path.join("vitfast", "cli", "train.py")


def test_no_tensor_is_made_from_host_data_on_the_device_each_step(monkeypatch):
    """torch.tensor called from train.py with a device: counted. Five steps logged every 5: the
    losses are still each step's (loss * count / count)."""
    calls = []
    real = torch.tensor

    def spy(*args, **kwargs):
        caller = sys._getframe(1).f_code
        if caller.co_filename.endswith(TRAIN) and kwargs.get("device") is not None:
            calls.append((caller.co_name, kwargs["device"]))
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "tensor", spy)
    res = run_inprocess(TINY + ["--log-every", "5", "--batch-size", "8", "--steps", "5"])
    assert calls == []
    assert [h["step"] for h in res.history] == [1, 2, 3, 4, 5]
    assert all(0 < h["loss"] < 10 and 0 <= h["acc"] <= 1 for h in res.history)
