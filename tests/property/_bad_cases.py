"""Every bad input the suites know, as data: ``(id, call, exception types, names)``.

The ops' cases are declared beside each op (``OpSpec.bad_inputs`` in ``vitfast/ops/<op>.py``);
this file adds the model-level ones. ``call()`` runs one public vitfast function on a bad
input; it must raise one of the exception types with a message naming one of ``names`` (the
offending argument), before any kernel runs. Used in-process
(tests/property/test_prop_bad_inputs.py) and in a child process (via :func:`main`), where a
signal (segfault, abort) or a hang fails the test instead of killing pytest.

Cases that currently fail (a defect in a file this suite does not own) are listed in
``KNOWN_DEFECTS`` with the fix; the tests mark them xfail(strict=True).
"""

from __future__ import annotations

import json
import sys

import torch

from vitfast.ops.spec import BadInput as Case  # (id, call, exc, names)

VE, TE = (ValueError,), (TypeError,)
EITHER = (ValueError, TypeError)

# id -> "defect; fix: exact fix"
KNOWN_DEFECTS: dict = {}


def _t(*shape, dtype=torch.float32):
    return torch.randn(*shape).to(dtype)


def _model_cases():
    import vitfast

    m = vitfast.FastViT(img_size=16, patch_size=8, embed_dim=16, depth=1, num_heads=2, num_classes=3).eval()
    im = _t(1, 3, 16, 16)
    sd = {k: v for k, v in m.state_dict().items() if k != "head.bias"}
    sd["blocks.0.attn.qkv.weight"] = _t(3, 3)
    sd["extra.weight"] = _t(1)
    return [
        Case("FastViT/images_size", lambda: m(_t(1, 3, 24, 24)), VE, ("img_size", "image size")),
        Case("FastViT/images_channels", lambda: m(_t(1, 4, 16, 16)), VE, ("channels",)),
        Case("FastViT/images_int", lambda: m(im.long()), TE, ("images",)),
        Case("FastViT/images_rank", lambda: m(im[0]), VE, ("images",)),
        Case("FastViT/backend", lambda: m.set_backend("fast"), VE, ("backend",)),
        Case("load_weights/mismatch", lambda: vitfast.models.weights.load_weights(m, sd), VE,
             ("head.bias",)),
    ]


def all_cases():
    from vitfast.ops.spec import SPECS

    return [case for spec in SPECS.values() for case in spec.bad_inputs()] + _model_cases()


def check(case: Case) -> str:
    """'' when ``case`` raised as expected, else what went wrong."""
    try:
        case.call()
    except case.exc as e:
        msg = str(e)
        if not any(n in msg for n in case.names):
            return f"{type(e).__name__} does not name any of {case.names}: {msg[:300]!r}"
        if case.id.startswith(("attention", "patch_embed", "layer_norm", "add_layer", "bias_")) and "vitfast" not in msg:
            return f"{type(e).__name__} does not say it comes from vitfast: {msg[:300]!r}"
        return ""
    except BaseException as e:  # noqa: BLE001  (reported, not swallowed)
        return f"raised {type(e).__name__} instead of {[x.__name__ for x in case.exc]}: {str(e)[:300]!r}"
    return f"no exception (expected {[x.__name__ for x in case.exc]})"


def main(argv=None) -> int:
    """Child-process entry: one JSON line per case; ``START <id>`` before each, flushed, so
    a case that kills the process is named by the parent."""
    import vitfast  # noqa: F401

    for case in all_cases():
        print(f"START {case.id}", flush=True)
        print("RESULT " + json.dumps({"id": case.id, "problem": check(case)}), flush=True)
    print("DONE", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
