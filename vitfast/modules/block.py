"""Transformer block with timm's names: norm1, attn, ls1, norm2, mlp, ls2.

:func:`block_forward` (shared with the timm ``Block``s that :func:`vitfast.patch_timm`
patches) runs the block on vitfast's fused epilogue ops, keeping every Parameter:

    h      = layer_norm(x)                                       norm1
    o      = attention before its output projection
    x, h   = add_layer_norm(x, o @ proj.W^T, ls1.gamma, norm2,   residual 1 + LayerScale
                            y_bias=proj.b)                       + proj bias + norm2, one pass
    a      = bias_gelu(h @ fc1.W^T, fc1.b)                       fc1 epilogue (or cuBLASLt's
                                                                 GELU_BIAS: linear_bias_gelu)
    x      = bias_scale_residual(x, a @ fc2.W^T, fc2.b, ls2.gamma)  fc2 epilogue + residual 2

Profiler ranges: while a profiler records (``torch.profiler``, ``emit_nvtx``) the block's two
sub-layers are ``record_function`` ranges, ``block{i}.attn`` (norm1 unless the previous block
made it, attention, projection, residual 1 and norm2) and ``block{i}.mlp`` (MLP, residual 2 and
the next norm when joined to it), on every path: fused in a chain, alone, or eager. ``{i}``
comes from the block's :data:`RANGE_LABEL` attribute (``vitfast profile`` sets it). With no
profiler, the cost is one check per sub-layer; under ``torch.compile`` there are no ranges.

Under autocast, h comes out in the autocast dtype (no extra cast pass) while the residual
stream keeps its dtype. Active dropout or drop-path (training with p > 0) runs the affected
step eagerly. A block whose structure the ops do not cover (not LayerNorm, not GELU) or an
input the kernels cannot serve runs eagerly: silently for ``"auto"`` on the CPU (the
documented reference path), with a one-time warning for ``"auto"`` on CUDA, and
``"kernel"`` raises with every reason.
"""

from __future__ import annotations

import contextlib
import sys
from typing import List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .._dispatch import module_uses_kernel
from ..ops.bias_gelu import linear_bias_gelu
from ..ops.layer_norm import add_layer_norm, add_layer_norm_not_supported_reasons, layer_norm
from ..ops.bias_scale_residual import bias_scale_residual
from .attention import Attention, attention_core
from .layers import DropPath, LayerScale, Mlp

__all__ = ["Block", "block_forward", "blocks_forward", "block_fallback_reasons", "block_structure_problems",
           "calls_only_forward", "fx_symbolic_tracing", "part_range", "RANGE_LABEL"]

_GELUS = {"GELU": "none", "GELUTanh": "tanh"}  # timm's activation classes -> approximate


def _gelu_approximate(act: nn.Module) -> Optional[str]:
    """``approximate`` of a GELU activation module; None for any other activation."""
    if isinstance(act, nn.GELU):
        return act.approximate
    return _GELUS.get(type(act).__name__)


def _gamma(ls: nn.Module) -> Optional[torch.Tensor]:
    return getattr(ls, "gamma", None)


def _active(m: nn.Module) -> bool:
    """A dropout / drop-path module that changes its input now."""
    return m.training and float(getattr(m, "p", getattr(m, "drop_prob", 0.0)) or 0.0) > 0.0


def _autocast_dtype(x: torch.Tensor) -> Optional[torch.dtype]:
    dev = x.device.type
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else None


def block_structure_problems(mod: nn.Module) -> List[str]:
    """What in ``mod`` (a vitfast or timm ViT block) the fused ops do not cover (empty: nothing)."""
    problems = []
    for name in ("norm1", "norm2"):
        n = getattr(mod, name, None)
        if not isinstance(n, nn.LayerNorm) or len(n.normalized_shape) != 1:
            problems.append(f"{name} is {type(n).__name__}, not a LayerNorm over the last dim")
    for name in ("ls1", "ls2"):
        ls = getattr(mod, name, None)
        if not isinstance(ls, nn.Identity) and not isinstance(_gamma(ls), torch.Tensor):
            problems.append(f"{name} is {type(ls).__name__}, neither Identity nor a LayerScale with gamma")
    mlp = getattr(mod, "mlp", None)
    if not _is_one_of(mlp, Mlp, "timm.layers", "Mlp") or not (
            isinstance(getattr(mlp, "fc1", None), nn.Linear) and isinstance(getattr(mlp, "fc2", None), nn.Linear)):
        # exactly the fc1/act/fc2 Mlp: a GluMlp or SwiGLU also has fc1 and fc2, and a GELU GluMlp
        # would pass an act check, but gates the activation (the fused path would drop the gate)
        problems.append(f"mlp is {type(mlp).__name__}, not vitfast's or timm's fc1/act/fc2 Mlp")
    elif _gelu_approximate(mlp.act) is None:
        problems.append(f"mlp.act is {type(mlp.act).__name__}; the fused epilogue is GELU (exact or tanh)")
    attn = getattr(mod, "attn", None)
    if not _is_one_of(attn, Attention, "timm.layers", "Attention") or not isinstance(getattr(attn, "proj", None),
                                                                                    nn.Linear):
        # the fused path rebuilds standard attention from qkv, q_norm/k_norm and norm (attention_core):
        # anything else an attention module does (timm's DiffAttention, a subclass's own forward)
        # would be dropped
        problems.append(f"attn is {type(attn).__name__}, not vitfast's or timm's standard Attention")
    else:
        if getattr(attn, "gate", None) is not None:
            problems.append("attn is gated (the fused attention has no output gate)")
        if attn.num_heads * attn.head_dim * 3 != attn.qkv.out_features:
            problems.append("attn.qkv width is not 3 * num_heads * head_dim")
    return problems


def _is_one_of(mod, vitfast_cls: type, timm_module: str, timm_name: str) -> bool:
    """``mod`` is exactly ``vitfast_cls`` or timm's ``timm_module.timm_name`` (not a subclass: its
    forward may do more). timm is not imported here: a module of timm's exists only once it is."""
    if type(mod) is vitfast_cls:
        return True
    timm_mod = sys.modules.get(timm_module)
    return timm_mod is not None and type(mod) is getattr(timm_mod, timm_name, None)


# The submodules whose work the fused path does without calling them (it reads their weights): a
# hook on one of them (feature extraction, a user's), an in-place compile or FSDP2 sharding of it
# would be skipped, so such a block runs its own forward instead (no warning: nothing is wrong).
_SKIPPED_CALLS = ("norm1", "norm2", "attn", "attn.proj", "mlp", "mlp.fc1", "mlp.act", "mlp.fc2", "ls1", "ls2")


def _skipped_calls_intercepted(mod: nn.Module) -> bool:
    """Whether a submodule the fused path does not call has hooks, is compiled or FSDP2-sharded."""
    for path in _SKIPPED_CALLS:
        sub = mod
        for name in path.split("."):
            sub = getattr(sub, name, None)
        if isinstance(sub, nn.Module) and not calls_only_forward(sub):
            return True
    return False


def block_fallback_reasons(mod: nn.Module, x: torch.Tensor) -> List[str]:
    """Why ``mod`` cannot run fused on ``x`` (empty: it can): its structure, then the kernels'
    limits (device, dtype, hidden size)."""
    problems = block_structure_problems(mod)
    if problems:
        return problems
    n2 = mod.norm2
    return add_layer_norm_not_supported_reasons(x, x, _gamma(mod.ls1), n2.weight, n2.bias)


# ------------------------------------------------------------------------ profiler ranges
# the attribute that names a block's ranges ("block3": block3.attn, block3.mlp): a plain one, so
# no state_dict entry and no hook (the block still fuses)
RANGE_LABEL = "_vitfast_range"
NVTX = False  # the ranges also as NVTX ranges (vitfast profile on CUDA, and under ncu / nsys)
_NO_RANGE = contextlib.nullcontext()


class _Range:
    """A record_function range (while a profiler records) and an NVTX range (while NVTX is on)."""

    __slots__ = ("name", "rf", "nvtx")

    def __init__(self, name: str):
        self.name, self.rf, self.nvtx = name, None, NVTX

    def __enter__(self):
        if torch._C._autograd._profiler_enabled():
            self.rf = torch.autograd.profiler.record_function(self.name)
            self.rf.__enter__()
        if self.nvtx:
            torch.cuda.nvtx.range_push(self.name)

    def __exit__(self, *exc):
        if self.nvtx:
            torch.cuda.nvtx.range_pop()
        if self.rf is not None:
            self.rf.__exit__(*exc)


def part_range(mod: nn.Module, part: str):
    """The profiler range over sub-layer ``part`` ("attn", "mlp") of block ``mod``, named
    ``f"{label}.{part}"`` (label: ``mod``'s :data:`RANGE_LABEL`, default "block"), while a
    profiler records or :data:`NVTX` is on; otherwise a shared no-op context. Never while
    torch.compile / torch.export trace (checked first: the profiler query would break the graph)."""
    if torch.compiler.is_compiling() or not (NVTX or torch._C._autograd._profiler_enabled()):
        return _NO_RANGE
    return _Range(f"{mod.__dict__.get(RANGE_LABEL, 'block')}.{part}")


def _eager(mod, x, attn_mask, is_causal):
    with part_range(mod, "attn"):
        x = x + mod.drop_path1(mod.ls1(mod.attn(mod.norm1(x), attn_mask=attn_mask, is_causal=is_causal)))
        h = mod.norm2(x)
    with part_range(mod, "mlp"):
        return x + mod.drop_path2(mod.ls2(mod.mlp(h)))


def _fused(mod, x, attn_backend, attn_mask, is_causal, op_backend="kernel", h=None, next_norm=None,
           next_dtype=None):
    """The fused block. ``h``: norm1(x) when the previous block already made it. ``next_norm``:
    a LayerNorm applied to the block's output (the next block's norm1, or the model's final
    norm), made in the same pass as the last residual; then the result is ``(x, next_norm(x))``
    (``next_norm(x)`` in ``next_dtype``, None: x's dtype) or ``(x, None)`` when active dropout
    leaves the residual to eager code."""
    # op_backend "auto" (the model's auto): each op follows the measured dispatch table (the block
    # already checked the kernels can serve it, so no op falls back with a warning)
    n1, n2, attn, mlp = mod.norm1, mod.norm2, mod.attn, mod.mlp
    od = _autocast_dtype(x)
    with part_range(mod, "attn"):
        if h is None:
            h = layer_norm(x, n1.weight, n1.bias, n1.eps, out_dtype=od, backend=op_backend)
        o = attention_core(attn, h, attn_backend, attn_mask, is_causal)
        if _active(mod.drop_path1) or _active(attn.proj_drop):
            x = x + mod.drop_path1(mod.ls1(attn.proj_drop(attn.proj(o))))
            h = layer_norm(x, n2.weight, n2.bias, n2.eps, out_dtype=od, backend=op_backend)
        else:
            x, h = add_layer_norm(x, F.linear(o, attn.proj.weight), _gamma(mod.ls1), n2.weight, n2.bias, n2.eps,
                                  y_bias=attn.proj.bias, out_dtype=od, backend=op_backend)
    with part_range(mod, "mlp"):
        a = linear_bias_gelu(h, mlp.fc1.weight, mlp.fc1.bias, _gelu_approximate(mlp.act), backend=op_backend)
        a = getattr(mlp, "norm", nn.Identity())(mlp.drop1(a))
        if _active(mod.drop_path2) or _active(mlp.drop2):
            x = x + mod.drop_path2(mod.ls2(mlp.drop2(mlp.fc2(a))))
            return x if next_norm is None else (x, None)
        if next_norm is None:
            return bias_scale_residual(x, F.linear(a, mlp.fc2.weight), mlp.fc2.bias, _gamma(mod.ls2),
                                       backend=op_backend)
        return add_layer_norm(x, F.linear(a, mlp.fc2.weight), _gamma(mod.ls2), next_norm.weight, next_norm.bias,
                              next_norm.eps, y_bias=mlp.fc2.bias, out_dtype=next_dtype, backend=op_backend)


def block_forward(mod: nn.Module, x: torch.Tensor, backend: str = "auto", attn_mask: Optional[torch.Tensor] = None,
                  is_causal: bool = False, attn_backend: Optional[str] = None) -> torch.Tensor:
    """``mod``'s forward (vitfast or timm block) on the fused ops where they apply (see the
    module docstring). ``attn_backend`` (default ``backend``) is passed to the attention."""
    attn_backend = backend if attn_backend is None else attn_backend
    if backend == "reference" or (backend == "auto" and x.device.type != "cuda"):
        return _eager(mod, x, attn_mask, is_causal)
    if not _skipped_calls_intercepted(mod) and module_uses_kernel("FastViT.block", backend,
                                                                  block_fallback_reasons(mod, x)):
        return _fused(mod, x, attn_backend, attn_mask, is_causal, "auto" if backend == "auto" else "kernel")
    return _eager(mod, x, attn_mask, is_causal)


def _fuses(mod: nn.Module, backend: str, x: torch.Tensor) -> bool:
    """Whether block_forward runs ``mod`` fused on ``x`` (warning or raising as it would)."""
    if backend == "reference" or (backend == "auto" and x.device.type != "cuda") or _skipped_calls_intercepted(mod):
        return False
    return module_uses_kernel("FastViT.block", backend, block_fallback_reasons(mod, x))


def _norm_joins(norm: Optional[nn.Module], mod: nn.Module, x: torch.Tensor) -> bool:
    """Whether ``norm`` (applied to ``mod``'s output) can be made by ``mod``'s last add_layer_norm."""
    return (isinstance(norm, nn.LayerNorm) and len(norm.normalized_shape) == 1 and norm.weight is not None
            and not add_layer_norm_not_supported_reasons(x, x, _gamma(mod.ls2), norm.weight, norm.bias))


_MODULE_HOOKS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")


def calls_only_forward(mod: nn.Module) -> bool:
    """Whether ``mod(x)`` does nothing but ``mod.forward(x)``, so that running the forward's work
    some other way (as :func:`blocks_forward` does, in pieces shared with its neighbours) skips
    nothing: no forward, pre-forward or backward hook of its own or global (a user's, a feature
    getter's, ``vitfast profile``'s, FSDP2's unsharding), not compiled in place
    (``mod.compile()``), not an FSDP2 module (``fully_shard``)."""
    from torch.nn.modules import module as _m

    if any(getattr(mod, h, None) or getattr(_m, "_global" + h, None) for h in _MODULE_HOOKS):
        return False
    if getattr(mod, "_compiled_call_impl", None) is not None:
        return False
    fsdp = sys.modules.get("torch.distributed.fsdp")  # not imported: no module can be an FSDPModule
    return not (fsdp is not None and isinstance(mod, getattr(fsdp, "FSDPModule", ())))


def _plain_block(mod: nn.Module) -> bool:
    """A vitfast :class:`Block` itself: not a subclass (FSDP2's ``FSDPBlock`` is one), not a
    wrapper (activation checkpointing's ``CheckpointWrapper`` forwards its attributes), its
    ``forward`` not replaced on the instance."""
    return type(mod) is Block and "forward" not in mod.__dict__


def fx_symbolic_tracing() -> bool:
    """Inside torch.fx.symbolic_trace (torch >= 2.12 names it apart from torch.export's tracing,
    whose is_fx_tracing() now warns on every call). Model loops run block by block then, so
    that each block is one leaf of the graph, instead of :func:`blocks_forward`'s chain."""
    from torch.fx import _symbolic_trace as st

    return (getattr(st, "is_fx_symbolic_tracing", None) or st.is_fx_tracing)()


def blocks_forward(blocks, x: torch.Tensor, final_norm: Optional[nn.Module] = None,
                   backends: Optional[List[Optional[Tuple[str, str]]]] = None):
    """The blocks one after another, and ``final_norm`` (None: none) of the result; returns
    ``(x, final_norm(x))``. Each block runs as :func:`block_forward` would, and where a fused
    block is followed by another fused block (or by the final LayerNorm), its last residual (fc2
    bias, LayerScale, residual add) and the next block's norm1 (or the final norm) are one
    ``add_layer_norm``: the residual stream is read and written once per sub-layer instead of
    once more at each block boundary.

    Only a block whose call is its forward and nothing more (:func:`calls_only_forward`: no hooks,
    not compiled, not FSDP2-sharded) is run in pieces; any other block is called, ``blk(x)``, and
    its neighbours end and start with their own residual and norm1. The final norm is joined
    only when it too :func:`calls_only_forward`, else called.

    ``backends``: per block ``(block backend, attention backend)``, or None for a block that runs
    its own forward (e.g. a timm block ``patch_timm`` left unpatched); default: each plain vitfast
    :class:`Block`'s ``attn.backend`` for both, None for anything else (a subclass, a wrapper)."""
    blocks = list(blocks)
    if backends is None:
        backends = [(b.attn.backend, b.attn.backend) if _plain_block(b) else None for b in blocks]
    fused = [be is not None and calls_only_forward(b) and _fuses(b, be[0], x) for b, be in zip(blocks, backends)]
    h = None
    for i, blk in enumerate(blocks):
        if not fused[i]:
            x, h = blk(x), None
            continue
        backend, attn_backend = backends[i]
        op_backend = "auto" if backend == "auto" else "kernel"
        last = i + 1 == len(blocks)
        nxt = None if last else blocks[i + 1]
        if nxt is not None and fused[i + 1] and _norm_joins(nxt.norm1, blk, x):
            x, h = _fused(blk, x, attn_backend, None, False, op_backend, h=h, next_norm=nxt.norm1,
                          next_dtype=_autocast_dtype(x))
        elif last and final_norm is not None and calls_only_forward(final_norm) and _norm_joins(final_norm, blk, x):
            # the final norm's output dtype as eager LayerNorm gives it: under CUDA autocast float32
            # (layer_norm is on its float32 list), whatever the residual's dtype (a bf16 model's too);
            # CPU autocast keeps the input's dtype
            fp32 = x.device.type == "cuda" and _autocast_dtype(x) is not None and x.dtype != torch.float64
            x, h = _fused(blk, x, attn_backend, None, False, op_backend, h=h, next_norm=final_norm,
                          next_dtype=torch.float32 if fp32 else None)
            return x, (h if h is not None else final_norm(x))
        else:
            x, h = _fused(blk, x, attn_backend, None, False, op_backend, h=h), None
    return x, (final_norm(x) if final_norm is not None else None)


class Block(nn.Module):
    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = False,
        qk_norm: bool = False,
        proj_bias: bool = True,
        proj_drop: float = 0.0,
        attn_drop: float = 0.0,
        init_values=None,
        drop_path: float = 0.0,
        act_layer: str = "gelu",
        norm_eps: float = 1e-6,
        backend: str = "auto",
    ):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = Attention(dim, num_heads, qkv_bias, qk_norm, proj_bias, attn_drop, proj_drop, norm_eps, backend)
        self.ls1 = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.drop_path1 = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer, bias=proj_bias, drop=proj_drop)
        self.ls2 = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.drop_path2 = DropPath(drop_path)

    def forward(
        self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None, is_causal: bool = False
    ) -> torch.Tensor:
        # the block follows its attention's backend, which FastViT.set_backend switches
        return block_forward(self, x, self.attn.backend, attn_mask, is_causal)


# a leaf of torch.fx graphs (see vitfast.models.vit): the kernel-or-reference choice needs real tensors
torch.fx.wrap("block_forward")
