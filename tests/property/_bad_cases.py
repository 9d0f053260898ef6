"""Every bad input the suites know, as data: ``(id, call, exception types, names)``.

``call()`` runs one public vitfast function on a bad input; it must raise one of the
exception types with a message naming one of ``names`` (the offending argument), before any
kernel runs. Used in-process (tests/property/test_prop_bad_inputs.py) and in a child process
(tests/test_robustness_subprocess.py, via :func:`main`), where a signal (segfault, abort)
or a hang fails the test instead of killing pytest.

Cases that currently fail (a defect in a file this suite does not own) are listed in
``KNOWN_DEFECTS`` with the fix; the tests mark them xfail(strict=True).
"""

from __future__ import annotations

import json
import sys
from typing import Callable, NamedTuple, Tuple

import torch


class Case(NamedTuple):
    id: str
    call: Callable[[], object]
    exc: Tuple[type, ...]
    names: Tuple[str, ...]


VE, TE = (ValueError,), (TypeError,)
EITHER = (ValueError, TypeError)

# id -> "defect; fix: exact fix"
KNOWN_DEFECTS: dict = {}


def _t(*shape, dtype=torch.float32):
    return torch.randn(*shape).to(dtype)


def _attention_cases():
    from vitfast.ops.attention import attention, attention_packed

    q = _t(2, 2, 5, 16)
    A = lambda *a, **k: (lambda: attention(*a, **k))  # noqa: E731
    P = lambda *a, **k: (lambda: attention_packed(*a, **k))  # noqa: E731
    return [
        Case("attention/q_not_tensor", A([[1.0]], q, q), TE, ("q",)),
        Case("attention/q_rank3", A(q[0], q[0], q[0]), VE, ("q",)),
        Case("attention/k_shape", A(q, _t(2, 2, 6, 16), q), VE, ("k",)),
        Case("attention/v_int", A(q, q, q.long()), TE, ("v",)),
        Case("attention/k_half", A(q, q.half(), q), TE, ("k",)),
        Case("attention/k_meta", A(q, q.to("meta"), q), VE, ("k",)),
        Case("attention/complex", A(*[q.to(torch.complex64)] * 3), TE, ("q",)),
        Case("attention/backend", A(q, q, q, backend="cuda"), VE, ("backend",)),
        Case("attention/head_dim_0", A(*[_t(1, 1, 3, 0)] * 3, backend="sdpa"), VE, ("q", "D")),
        Case("attention/scale_str", A(q, q, q, scale="a", backend="sdpa"), TE, ("scale",)),
        Case("attention/scale_bool", A(q, q, q, scale=True), TE, ("scale",)),
        Case("attention/scale_list", A(q, q, q, scale=[0.5]), TE, ("scale",)),
        Case("attention/scale_tensor_2", A(q, q, q, scale=torch.ones(2), backend="triton"), TE, ("scale",)),
        Case("attention_packed/scale_str", P(_t(1, 4, 48), num_heads=2, scale="0.5"), TE, ("scale",)),
        Case("attention/triton_head_dim_12", A(*[_t(1, 1, 3, 12)] * 3, backend="triton"), VE, ("q.shape[-1]",)),
        Case("attention/triton_head_dim_264", A(*[_t(1, 1, 3, 264)] * 3, backend="triton"), VE, ("q.shape[-1]",)),
        Case("attention/triton_float64", A(*[q.double()] * 3, backend="triton"), VE, ("dtype",)),
        Case("attention/triton_last_stride", A(*[_t(1, 1, 3, 32)[..., ::2]] * 3, backend="triton"), VE,
             ("stride(-1)",)),
        Case("attention_packed/not_tensor", P([1.0], num_heads=1), TE, ("qkv",)),
        Case("attention_packed/heads_0", P(_t(1, 4, 48), num_heads=0), VE, ("num_heads",)),
        Case("attention_packed/heads_neg", P(_t(1, 4, 48), num_heads=-2), VE, ("num_heads",)),
        Case("attention_packed/heads_float", P(_t(1, 4, 48), num_heads=2.0), VE, ("num_heads",)),
        Case("attention_packed/heads_bool", P(_t(1, 4, 48), num_heads=True), VE, ("num_heads",)),
        Case("attention_packed/C_not_3HD", P(_t(1, 4, 50), num_heads=2), VE, ("qkv",)),
        Case("attention_packed/rank2", P(_t(4, 48), num_heads=2), VE, ("qkv",)),
        Case("attention_packed/int", P(_t(1, 4, 48).long(), num_heads=2), TE, ("qkv",)),
        Case("attention_packed/C_0", P(_t(1, 4, 0), num_heads=2, backend="sdpa"), VE, ("qkv",)),
        Case("attention_packed/triton_head_dim_8", P(_t(1, 4, 48), num_heads=2, backend="triton"), VE,
             ("q.shape[-1]",)),
    ]


def _patch_embed_cases():
    from vitfast.ops.patch_embed import patch_embed

    im, w = _t(2, 3, 8, 8), _t(6, 3, 4, 4)
    E = lambda *a, **k: (lambda: patch_embed(*a, **k))  # noqa: E731
    return [
        Case("patch_embed/images_not_tensor", E([[1.0]], w), EITHER, ("images",)),
        Case("patch_embed/images_rank3", E(im[0], w), VE, ("images",)),
        Case("patch_embed/weight_none", E(im, None), EITHER, ("weight",)),
        Case("patch_embed/weight_rank2", E(im, w.flatten(1)), VE, ("weight",)),
        Case("patch_embed/not_divisible", E(_t(2, 3, 9, 8), w), VE, ("patch size", "divisible")),
        Case("patch_embed/not_square", E(im, _t(6, 3, 4, 2)), VE, ("weight",)),
        Case("patch_embed/patch_0", E(im, _t(6, 3, 0, 0)), VE, ("weight",)),
        Case("patch_embed/channels", E(im, _t(6, 2, 4, 4)), VE, ("channels", "weight")),
        Case("patch_embed/channels_0", E(_t(2, 0, 8, 8), _t(6, 0, 4, 4)), VE, ("images",)),
        Case("patch_embed/images_int8", E(im.to(torch.int8), w), TE, ("images",)),
        Case("patch_embed/images_bool", E(im > 0, w), TE, ("images",)),
        Case("patch_embed/weight_int", E(im, w.long()), TE, ("weight",)),
        Case("patch_embed/bias_shape", E(im, w, _t(5)), VE, ("bias",)),
        Case("patch_embed/bias_int", E(im, w, torch.ones(6, dtype=torch.long)), TE, ("bias",)),
        Case("patch_embed/bias_list", E(im, w, [0.0] * 6), TE, ("bias",)),
        Case("patch_embed/cls_shape", E(im, w, cls_token=_t(1, 2, 6)), VE, ("cls_token",)),
        Case("patch_embed/pos_shape", E(im, w, pos_embed=_t(1, 5, 6)), VE, ("pos_embed",)),
        Case("patch_embed/pos_list", E(im, w, pos_embed=[0.0] * 6), TE, ("pos_embed",)),
        Case("patch_embed/weight_meta", E(im, w.to("meta")), VE, ("weight",)),
        Case("patch_embed/mean_without_std", E(im, w, mean=[0.5] * 3), VE, ("std",)),
        Case("patch_embed/mean_len", E(im, w, mean=[0.5] * 2, std=[0.5] * 3), VE, ("mean",)),
        Case("patch_embed/std_zero", E(im, w, mean=[0.5] * 3, std=[0.5, 0.0, 0.5]), VE, ("std",)),
        Case("patch_embed/mean_scalar", E(im, w, mean=0.5, std=0.5), TE, ("mean",)),
        Case("patch_embed/mean_complex", E(im, w, mean=torch.zeros(3, dtype=torch.complex64), std=torch.ones(3)),
             TE, ("mean",)),
        Case("patch_embed/mean_nested", E(im, w, mean=[[0.5]] * 3, std=[0.5] * 3), TE, ("mean",)),
        Case("patch_embed/std_str", E(im, w, mean=[0.5] * 3, std="abc"), TE, ("std",)),
        Case("patch_embed/std_digit_str", E(im, w, mean=[0.5] * 3, std="123"), TE, ("std",)),
        Case("patch_embed/mean_none_items", E(im, w, mean=[None] * 3, std=[0.5] * 3), TE, ("mean",)),
        Case("patch_embed/cls_tuple", E(im, w, cls_token=(0.0,) * 6), TE, ("cls_token",)),
        # the registered op itself, past the Python wrapper: the C++ checks (TORCH_CHECK_VALUE)
        Case("patch_embed/op_not_divisible", lambda: torch.ops.vitfast.patch_embed(_t(1, 3, 9, 8), w),
             VE, ("divisible",)),
        Case("patch_embed/op_channels", lambda: torch.ops.vitfast.patch_embed(im, _t(6, 2, 4, 4)), VE, ("channels",)),
        Case("patch_embed/op_pos_shape", lambda: torch.ops.vitfast.patch_embed(im, w, None, None, _t(1, 3, 6)), VE,
             ("pos_embed",)),
        Case("patch_embed/op_mean_len", lambda: torch.ops.vitfast.patch_embed(
            im, w, None, None, None, torch.zeros(2, dtype=torch.float64), torch.ones(2, dtype=torch.float64)),
             VE, ("mean",)),
        Case("patch_embed/op_backward_grad_shape", lambda: torch.ops.vitfast.patch_embed_backward(
            _t(2, 5, 6), im, w, None, None, False, 0, [True, True, False, False, False]), VE, ("grad_out",)),
    ]


def _fused_cases():
    from vitfast.ops.bias_gelu import bias_gelu
    from vitfast.ops.layer_norm import add_layer_norm, layer_norm
    from vitfast.ops.bias_scale_residual import bias_scale_residual

    x, v = _t(2, 5, 12), _t(12)
    out = []
    for be in ("triton", "reference"):
        L = lambda *a, **k: (lambda: layer_norm(*a, backend=be, **k))  # noqa: E731
        AL = lambda *a, **k: (lambda: add_layer_norm(*a, backend=be, **k))  # noqa: E731
        G = lambda *a, **k: (lambda: bias_gelu(*a, backend=be, **k))  # noqa: E731
        R = lambda *a, **k: (lambda: bias_scale_residual(*a, backend=be, **k))  # noqa: E731
        out += [
            Case(f"layer_norm[{be}]/hidden_0", L(_t(2, 0)), VE, ("x",)),
            Case(f"layer_norm[{be}]/scalar", L(torch.tensor(1.0)), VE, ("x",)),
            Case(f"layer_norm[{be}]/weight_shape", L(x, _t(11)), VE, ("weight",)),
            Case(f"layer_norm[{be}]/weight_list", L(x, [1.0] * 12), TE, ("weight",)),
            Case(f"layer_norm[{be}]/x_int", L(x.long()), TE, ("x",)),
            Case(f"layer_norm[{be}]/eps_negative", L(x, eps=-1.0), VE, ("eps",)),
            Case(f"layer_norm[{be}]/eps_nan", L(x, eps=float("nan")), VE, ("eps",)),
            Case(f"layer_norm[{be}]/out_dtype_int", L(x, out_dtype=torch.int32), TE, ("out_dtype",)),
            Case(f"layer_norm[{be}]/bias_meta", L(x, None, v.to("meta")), VE, ("bias",)),
            Case(f"add_layer_norm[{be}]/y_shape", AL(x, x[:1]), VE, ("y",)),
            Case(f"add_layer_norm[{be}]/gamma_shape", AL(x, x, _t(3)), VE, ("gamma",)),
            Case(f"add_layer_norm[{be}]/y_bias_int", AL(x, x, y_bias=torch.ones(12, dtype=torch.long)), TE,
                 ("y_bias",)),
            Case(f"bias_gelu[{be}]/approximate", G(x, v, approximate="fast"), VE, ("approximate",)),
            Case(f"bias_gelu[{be}]/bias_shape", G(x, _t(13)), VE, ("bias",)),
            Case(f"bias_gelu[{be}]/x_not_tensor", G(1.0, v), TE, ("x",)),
            Case(f"bias_scale_residual[{be}]/y_shape", R(x, _t(2, 5, 13)), VE, ("y",)),
            Case(f"bias_scale_residual[{be}]/gamma_rank2", R(x, x, None, _t(1, 12)), VE, ("gamma",)),
            Case(f"bias_scale_residual[{be}]/y_bool", R(x, x > 0), TE, ("y",)),
        ]
    out.append(Case("layer_norm/backend", lambda: layer_norm(x, backend="cuda"), VE, ("backend",)))
    return out


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
    return _attention_cases() + _patch_embed_cases() + _fused_cases() + _model_cases()


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
