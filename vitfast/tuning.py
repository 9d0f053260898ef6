"""Tuning: time every op's kernel and torch paths at a model's real shapes, write the dispatch cache.

    import vitfast
    model = vitfast.create_model("vit_base_patch16_224").cuda()
    vitfast.tune(model, torch.randn(256, 3, 224, 224, device="cuda"), train=True, dtype=torch.bfloat16)

or ``vitfast tune --model vit_base_patch16_224 --batch-size 256 --dtype bf16 --train``.

How: the model runs once (forward, and backward with ``train``) inside
:func:`vitfast.dispatch.capture`, which collects every call that asked the dispatch for a path:
op, device, dtype, mode and the shape signature (attention: head dim ``D``, length ``N`` and
``BH`` = batch x heads; the fused epilogues: width ``C`` and ``rows``). Each distinct call is then
timed through the op itself, its two paths forced in turn with :func:`vitfast.dispatch.forced`
(CUDA events, warm-up, the paths alternating round by round, the median of the per-round
ratios), on fresh random inputs of that signature, the op called as the model calls it. The result
is one entry per call, ``choice = "torch"`` only where the kernel was more than ``dispatch.MARGIN``
slower, merged into the user's cache (``~/.cache/vitfast/dispatch.json``,
``VITFAST_DISPATCH_CACHE``) as soon as it is measured, which then wins over the shipped table
(:func:`vitfast.dispatch.load_table`). Nothing is timed inside a capture or a trace: tuning is a
separate, explicit step.

Tuning measures CUDA only: on the CPU ``backend="auto"`` always takes the reference path.
"""

from __future__ import annotations

import datetime
from pathlib import Path
from typing import Callable, Dict, Iterable, Iterator, List, Optional

import torch

from . import dispatch

__all__ = ["tune", "captured_calls", "time_call", "measure"]

TUNABLE = ("patch_embed", "attention", "attention_packed", "layer_norm", "add_layer_norm", "bias_gelu", "bias_scale_residual",
           "linear_bias_gelu")


def captured_calls(model: torch.nn.Module, example_input: torch.Tensor, train: bool = False,
                   dtype: Optional[torch.dtype] = None) -> List[dict]:
    """The distinct dispatch calls one step of ``model`` makes (forward; with ``train`` also the
    backward, grads enabled), under autocast to ``dtype`` when given."""
    was_training = model.training
    model.train(train)
    try:
        autocast = (torch.autocast(example_input.device.type, dtype=dtype) if dtype is not None
                    else torch.autocast(example_input.device.type, enabled=False))
        with dispatch.capture() as calls, torch.set_grad_enabled(train), autocast:
            out = model(example_input)
            if train:
                out.float().sum().backward()
    finally:
        model.train(was_training)
        if train:
            model.zero_grad(set_to_none=True)
    return list(calls.values())


def _inputs(call: dict) -> Callable[[], Callable[[], object]]:
    """A builder of one call of the op (fresh random inputs of the call's signature), returning a
    function that runs it with ``backend="auto"`` (so the dispatch decides)."""
    op, dev, dt, grad, s = call["op"], call["device"], call["dtype"], call["training"], call["shape"]
    if op in ("attention", "attention_packed"):
        from .ops.attention import attention, attention_packed

        BH, N, D = int(s["BH"]), int(s["N"]), int(s["D"])
        if op == "attention":
            q, k, v = (torch.randn(1, BH, N, D, device=dev, dtype=dt).requires_grad_(grad) for _ in range(3))
            return lambda: attention(q, k, v)
        qkv = torch.randn(BH, N, 3 * D, device=dev, dtype=dt).requires_grad_(grad)
        return lambda: attention_packed(qkv, num_heads=1)
    if op == "linear_bias_gelu":  # asks the table only where cuBLASLt's tanh-GELU epilogue may serve it
        from .ops.bias_gelu import linear_bias_gelu

        rows, C, K = int(s["rows"]), int(s["C"]), int(s["K"])
        h = torch.randn(rows, K, device=dev, dtype=dt)
        w, b = torch.randn(C, K, device=dev, dtype=dt) * K ** -0.5, torch.randn(C, device=dev, dtype=dt)
        return lambda: linear_bias_gelu(h, w, b, "tanh")
    if op == "patch_embed":  # "kernel": the fused Triton kernel; "torch": the C++ three-kernel cuBLAS path
        return _patch_embed_call(s, dev, dt, grad)
    from .cli.kernels.fused import make_inputs
    from .ops.spec import SPECS

    args, kwargs = make_inputs(op, int(s["rows"]), int(s["C"]), dt, dev, grad=grad)
    fn = SPECS[op].fn
    return lambda: fn(*args, **kwargs)


def _patch_embed_call(s: dict, dev, dt: torch.dtype, grad: bool) -> Callable[[], object]:
    """One patch_embed call as FastViT makes it (``modules.patch_embed.embed_images``): uint8 images
    with the model's mean/std, float images without (taken as already normalised). A training call in
    half precision runs as ``vitfast tune --train`` and ``vitfast bench`` train: float32 images and
    float32 parameters under autocast to the call's dtype (the op casts the parameters, the images
    stay float32: twice the bytes of a half-precision image, the bulk of the op's traffic)."""
    from .ops.patch_embed import patch_embed

    B, T, D, C, p = (int(s[k]) for k in ("B", "T", "D", "C", "p"))
    amp = grad and dt in (torch.float16, torch.bfloat16)
    pdt = torch.float32 if amp else dt
    shape = (B, C, p, p * max(T - 1, 1))  # T - 1 patches in a row, + the class token: only B*T and K matter
    u8 = s["u8"] == 2
    images = (torch.randint(0, 256, shape, device=dev, dtype=torch.uint8) if u8
              else torch.randn(shape, device=dev, dtype=pdt))
    w = (torch.randn(D, C, p, p, device=dev, dtype=pdt) * (C * p * p) ** -0.5).requires_grad_(grad)
    b, cls = (torch.zeros(shape_, device=dev, dtype=pdt).requires_grad_(grad) for shape_ in ((D,), (1, 1, D)))
    pos = torch.zeros(1, T, D, device=dev, dtype=pdt).requires_grad_(grad)
    mean = std = None
    if u8:
        mean = tuple((0.485, 0.456, 0.406)[c % 3] for c in range(C))
        std = tuple((0.229, 0.224, 0.225)[c % 3] for c in range(C))

    def run():
        with torch.autocast(torch.device(dev).type, dtype=dt, enabled=amp):
            return patch_embed(images, w, b, cls_token=cls, pos_embed=pos, mean=mean, std=std)
    return run


def _step(run: Callable[[], object], mode: str, train: bool) -> Callable[[int], None]:
    def once():
        with dispatch.forced(mode):
            return run()

    if not train:
        def step(i):
            with torch.no_grad():
                once()
        return step
    outs = once()
    outs = outs if isinstance(outs, tuple) else (outs,)
    grads = [torch.randn_like(o) for o in outs]
    del outs

    def step(i):
        outs = once()
        torch.autograd.backward(outs if isinstance(outs, tuple) else (outs,), grads)
    return step


def time_call(call: dict, warmup: int = 10, iters: int = 30) -> dict:
    """Both paths of one captured call, timed alternately; the entry for the dispatch cache (with
    the timings in its ``note``)."""
    from .cli import benchmarking as bu

    device = call["device"]
    run = _inputs(call)
    group = [dict(impl="kernel"), dict(impl="torch")]
    times = bu.time_group(group, lambda impl: _step(run, impl, call["training"]), warmup=warmup, iters=iters,
                          device=device)
    failed = [f"{r['impl']}: {r['status']}" for r in group if r.get("status") != "ok"]
    if failed:
        raise RuntimeError(f"vitfast.tune: {call['op']} {call['shape']}: " + "; ".join(failed))
    speedup = bu.paired_speedup(times, "torch", "kernel")
    ms = {r["impl"]: r["ms"] for r in group}
    key = dispatch.device_key(device)
    return dict(op=call["op"], device=key, dtype=dispatch.dtype_name(call["dtype"]),
                mode="train" if call["training"] else "infer", shape=dict(call["shape"]),
                choice=dispatch.decide(speedup), source=f"tuned:{datetime.date.today().isoformat()}",
                note=f"kernel {speedup:.2f}x torch (kernel {ms['kernel']:.4f} ms, torch {ms['torch']:.4f} ms)")


def tune(model: torch.nn.Module, example_input: torch.Tensor, train: bool = False, *,
         dtype: Optional[torch.dtype] = None, cache: Optional[Path] = None, write: bool = True,
         warmup: int = 10, iters: int = 30) -> List[dict]:
    """Time the kernel and torch paths of every op ``model`` calls on ``example_input`` (a CUDA
    tensor, the real batch) and write the choices to the dispatch cache (``cache``, default
    :func:`vitfast.dispatch.cache_path`; ``write=False`` only returns them). ``train``: the
    forward+backward paths (training), else inference. ``dtype``: run under autocast to it (the
    model's own dtype otherwise). Each entry goes into the cache as soon as it is measured
    (:func:`measure`), so an interrupted run keeps the entries measured so far. Returns the
    entries written."""
    if not isinstance(example_input, torch.Tensor):
        raise TypeError(f"vitfast.tune: example_input must be a torch.Tensor, got {type(example_input).__name__}")
    if example_input.device.type != "cuda":
        raise ValueError(f"vitfast.tune: example_input is on {example_input.device}; the measured dispatch chooses "
                         "between paths on CUDA only (on the CPU, backend='auto' always takes the reference path), "
                         "so tuning needs the model and a CUDA input")
    calls = [c for c in captured_calls(model, example_input, train, dtype) if c["op"] in TUNABLE]
    return list(measure(calls, cache=cache, write=write, warmup=warmup, iters=iters))


def measure(calls: Iterable[dict], *, cache: Optional[Path] = None, write: bool = True, warmup: int = 10,
            iters: int = 30) -> Iterator[dict]:
    """:func:`time_call` on each call in turn, yielding its entry once it is in the cache (with
    ``write``: merged by :func:`vitfast.dispatch.write_cache`, a temporary file then a rename), so
    that a run stopped part-way (an exception, Ctrl-C, ``timeout -s INT``) keeps every entry it
    measured and never leaves a half-written file."""
    for call in calls:
        entry = time_call(call, warmup=warmup, iters=iters)
        if write:
            dispatch.write_cache([entry], cache)
        yield entry


def format_entries(entries: List[dict]) -> str:
    lines = [f"{'op':<20} {'dtype':<9} {'mode':<5} {'shape':<28} {'choice':<6} note"]
    for e in entries:
        shape = ",".join(f"{k}={v}" for k, v in sorted(e["shape"].items()))
        lines.append(f"{e['op']:<20} {e['dtype']:<9} {e['mode']:<5} {shape:<28} {e['choice']:<6} {e.get('note', '')}")
    return "\n".join(lines)


def calls_summary(calls: List[dict]) -> Dict[str, int]:
    out: Dict[str, int] = {}
    for c in calls:
        out[c["op"]] = out.get(c["op"], 0) + 1
    return out
