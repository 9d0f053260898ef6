"""Swap vitfast's kernels into a live timm VisionTransformer, in place, and back.

One table, :data:`RULES`: each rule names a timm class, the method of its instances that is
replaced, the vitfast function that replaces it, and what makes an instance unsuitable. Patching
binds the function to each matching instance (an instance attribute shadowing the class's
method, a :class:`_Bound` that pickles and deep-copies); no module, Parameter or buffer is
replaced, so an optimizer, a DDP wrapper or an EMA built before patching stays valid. An
instance whose method is already replaced on the instance (a user's wrapper, Accelerate's
``add_hook_to_module``) is left alone. :func:`unpatch_timm` deletes the attributes it set.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable, List, Optional

import torch
import torch.nn as nn

from .._dispatch import warn_fallback_once
from ..modules.attention import attention_forward, check_backend
from ..modules.block import (block_forward, block_structure_problems, blocks_forward, calls_only_forward,
                             fx_symbolic_tracing)
from ..modules.patch_embed import check_images, embed_images, images_for_proj

__all__ = ["patch_timm", "unpatch_timm", "is_patched", "RULES", "PatchRule"]

_MARK = "_vitfast_patched"  # instance attribute: {method name: backend}


# torch.fx.symbolic_trace / torchvision's create_feature_extractor: these calls are leaves of the
# graph, run with real tensors (input checks and the kernel-or-reference choice never see a Proxy)
torch.fx.wrap("check_images")
torch.fx.wrap("embed_images")
torch.fx.wrap("images_for_proj")
torch.fx.wrap("block_forward")
torch.fx.wrap("attention_forward")


@dataclass(frozen=True)
class PatchRule:
    feature: str  # the patch_timm flag that enables the rule
    target: Callable[[], type]  # the timm class, resolved lazily
    method: str  # the instance method replaced
    replacement: Callable  # function(self, ...) bound to each matching instance
    problems: Callable[[nn.Module], List[str]]  # why an instance cannot be patched (empty: it can)


def _timm_attention():
    from timm.layers import Attention

    return Attention


def _timm_vit():
    from timm.models.vision_transformer import VisionTransformer

    return VisionTransformer


def _timm_block():
    from timm.models.vision_transformer import Block

    return Block


def _attention_problems(mod: nn.Module) -> List[str]:
    problems = []
    if getattr(mod, "gate", None) is not None:
        problems.append("gated attention")
    if mod.num_heads * mod.head_dim * 3 != mod.qkv.out_features:
        problems.append("qkv width is not 3 * num_heads * head_dim")
    return problems


def _vit_problems(mod: nn.Module) -> List[str]:
    problems = []
    pe = mod.patch_embed
    proj = getattr(pe, "proj", None)
    if mod.pos_embed is None:
        problems.append("no learned pos_embed")
    if not isinstance(proj, nn.Conv2d) or proj.kernel_size != proj.stride or proj.kernel_size[0] != proj.kernel_size[1] \
            or proj.padding != (0, 0) or proj.groups != 1:
        problems.append("patch_embed.proj is not a square stride-p Conv2d")
    if not isinstance(getattr(pe, "norm", nn.Identity()), nn.Identity) or getattr(pe, "dynamic_img_pad", False):
        problems.append("patch_embed has a norm layer or dynamic_img_pad")
    return problems


class _Bound:
    """``func`` bound to ``module``, as ``types.MethodType`` (``__func__``, ``__self__``), that
    pickles (``torch.save(model)``) as the function's qualified name and the module, where a
    bound method pickles as ``getattr(module, func.__name__)``, which does not exist at load.
    ``copy.deepcopy`` binds the copy's function to the copied module."""

    __slots__ = ("__func__", "__self__")

    def __init__(self, func: Callable, module: nn.Module):
        self.__func__, self.__self__ = func, module

    def __call__(self, *args, **kwargs):
        return self.__func__(self.__self__, *args, **kwargs)

    def __reduce__(self):
        return _Bound, (self.__func__, self.__self__)

    def __repr__(self) -> str:
        return f"<vitfast bound method {self.__func__.__qualname__} of {type(self.__self__).__name__}>"


def _ours(value, mod: nn.Module) -> bool:
    """Whether ``value`` (an attribute of ``mod``'s ``__dict__``) is one :func:`patch_timm` set."""
    return isinstance(value, _Bound) and value.__self__ is mod and value.__func__ in _SET_BY_PATCH


def _backend(mod: nn.Module, method: str) -> str:
    """The backend ``mod.method`` was patched with; "reference" (timm's computation) once
    unpatched, for a wrapper that kept the patched method and still calls it."""
    return mod.__dict__.get(_MARK, {}).get(method, "reference")


def _attention_forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None, is_causal: bool = False):
    """vitfast's attention for a timm ``Attention`` (see :func:`vitfast.modules.attention.attention_forward`)."""
    return attention_forward(self, x, _backend(self, "forward"), attn_mask, is_causal)


def _block_forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None, is_causal: bool = False):
    """vitfast's fused block for a timm ``Block`` (see :func:`vitfast.modules.block.block_forward`);
    the attention runs on vitfast's kernel only if the attention rule patched it too."""
    attn_marks = self.attn.__dict__.get(_MARK, {})
    return block_forward(self, x, _backend(self, "forward"), attn_mask, is_causal,
                         attn_backend=attn_marks.get("forward", "reference"))


def _vit_forward_features(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None, is_causal: bool = False):
    """timm's ``VisionTransformer.forward_features`` with the fused patch embedding; takes uint8
    images too (normalised with the model's ``pretrained_cfg`` mean/std). With hooks on
    ``patch_embed`` or its ``proj`` (or either compiled or FSDP2-sharded), and under
    ``torch.fx.symbolic_trace``, timm's own ``forward_features`` runs, so that they fire and the
    graph keeps timm's node names (``patch_embed``, ...); the blocks stay patched."""
    from timm.models._manipulate import checkpoint_seq

    pe = self.patch_embed
    check_images(x, pe.proj.in_channels, pe.patch_size[0], pe.img_size, self.dynamic_img_size, "patched timm ViT")
    cfg = getattr(self, "pretrained_cfg", None) or {}
    chans = pe.proj.in_channels  # not x.shape[1]: x may be an FX Proxy
    mean, std = cfg.get("mean"), cfg.get("std")
    if mean is None or std is None or len(mean) != chans or len(std) != chans:  # e.g. in_chans=1 of an RGB cfg
        mean, std = (0.5,) * chans, (0.5,) * chans
    if fx_symbolic_tracing() or not all(calls_only_forward(m) for m in pe.modules()):
        x = images_for_proj(x, mean, std, pe.proj.weight.dtype)
        if attn_mask is None and not is_causal:  # (a timm whose forward_features takes no mask)
            return type(self).forward_features(self, x)
        return type(self).forward_features(self, x, attn_mask=attn_mask, is_causal=is_causal)
    x = embed_images(
        x, pe.proj, cls_token=self.cls_token, reg_token=self.reg_token, pos_embed=self.pos_embed,
        no_embed_class=self.no_embed_class, grid_size=pe.grid_size, mean=mean, std=std,
        backend=_backend(self, "forward_features"),
    )
    x = self.norm_pre(self.patch_drop(self.pos_drop(x)))
    if attn_mask is not None or is_causal:
        for blk in self.blocks:
            x = blk(x, attn_mask=attn_mask, is_causal=is_causal)
    elif self.grad_checkpointing and not torch.jit.is_scripting():
        x = checkpoint_seq(self.blocks, x)
    else:
        backends = [_fused_backends(blk) for blk in self.blocks]
        # hooks on the Sequential itself (timm calls it): no chain, so that they fire
        if any(b is not None for b in backends) and calls_only_forward(self.blocks) and not fx_symbolic_tracing():
            # patched blocks hand the residual stream to the next block's norm1 (and the last one
            # to the final norm) in one add_layer_norm each, as FastViT does (blocks_forward)
            return blocks_forward(self.blocks, x, self.norm, backends)[1]
        x = self.blocks(x)
    return self.norm(x)


def _fused_backends(blk: nn.Module) -> Optional[tuple]:
    """(block backend, attention backend) of a timm ``Block`` the "fused" rule patched; None for
    anything else, which blocks_forward then calls: an unpatched block, a subclass (FSDP2's
    ``FSDPBlock``), a wrapper (``CheckpointWrapper``), a block whose forward was replaced since."""
    marks = blk.__dict__.get(_MARK, {})
    fwd = blk.__dict__.get("forward")
    if "forward" not in marks or type(blk) is not _timm_block() or not _ours(fwd, blk) \
            or fwd.__func__ is not _block_forward:
        return None
    return marks["forward"], blk.attn.__dict__.get(_MARK, {}).get("forward", "reference")


RULES = (
    PatchRule("attention", _timm_attention, "forward", _attention_forward, _attention_problems),
    PatchRule("patch_embed", _timm_vit, "forward_features", _vit_forward_features, _vit_problems),
    PatchRule("fused", _timm_block, "forward", _block_forward, block_structure_problems),
)


def patch_timm(model: nn.Module, attention: bool = True, patch_embed: bool = True, fused: bool = True,
               backend: str = "auto") -> nn.Module:
    """Run a live timm ViT (``model`` or any module holding one) on vitfast's kernels, in place.

    ``attention``: every timm ``Attention`` computes through ``vitfast.ops.attention_packed``.
    ``patch_embed``: ``VisionTransformer.forward_features`` embeds through the fused
    ``vitfast.ops.patch_embed`` (and accepts uint8 images). ``fused``: every timm ``Block`` runs
    its LayerNorms, residual adds, LayerScales and MLP/projection bias epilogues on vitfast's fused
    ops (:func:`vitfast.modules.block.block_forward`). ``backend`` as for FastViT: "auto"
    falls back per call with a one-time warning, "kernel" raises where a kernel cannot serve.
    Returns ``model``; every Parameter object is kept. Undo with :func:`unpatch_timm`.

    A module whose method is already replaced on the instance (``module.forward = wrapper``, as
    Accelerate's ``add_hook_to_module`` does) is left alone, named in a one-time warning: patch
    before wrapping. The patched model pickles (``torch.save(model)``) and deep-copies patched.
    """
    backend = check_backend(backend)
    flags = {"attention": attention, "patch_embed": patch_embed, "fused": fused}
    rules = [(r, r.target()) for r in RULES if flags[r.feature]]
    matched, skipped = 0, []
    for name, mod in model.named_modules():
        for rule, cls in rules:
            if type(mod) is not cls:
                continue
            matched += 1
            problems = rule.problems(mod)
            current = mod.__dict__.get(rule.method)
            if current is not None and not _ours(current, mod):
                problems = problems + [f"{rule.method} is already replaced on the instance (by "
                                       f"{getattr(current, '__qualname__', type(current).__name__)}); patch before "
                                       "wrapping"]
            if problems:
                skipped.append(f"{name or type(mod).__name__}: {'; '.join(problems)}")
                continue
            mod.__dict__.setdefault(_MARK, {})[rule.method] = backend
            setattr(mod, rule.method, _Bound(rule.replacement, mod))
            # torch.jit.script: the vitfast methods are not scriptable; script an unpatched copy
            if _SCRIPTABLE not in mod.__dict__:
                mod.__dict__[_SCRIPTABLE] = _Bound(_unpatched_copy, mod)
    if not matched and any(flags.values()):
        wanted = ", ".join(cls.__name__ for _, cls in rules)
        raise TypeError(f"vitfast.patch_timm: {type(model).__name__} holds no timm module to patch ({wanted})")
    if skipped:
        warn_fallback_once("patch_timm", skipped, fallback="timm (left unpatched)")
    return model


def unpatch_timm(model: nn.Module) -> nn.Module:
    """Undo :func:`patch_timm`: every patched instance gets its class's methods back. Only the
    attributes patch_timm set are deleted: a method replaced since (a wrapper around the patched
    one) stays, and the patched method it may call computes as timm does from then on."""
    for mod in model.modules():
        marks = mod.__dict__.pop(_MARK, None)
        for name in [*(marks or ()), _SCRIPTABLE]:
            if _ours(mod.__dict__.get(name), mod):
                del mod.__dict__[name]
    return model


_SCRIPTABLE = "__prepare_scriptable__"


def _unpatched_copy(mod: nn.Module) -> nn.Module:
    """What ``torch.jit.script`` compiles for a patched module: a copy with timm's own methods
    (the same weights and mode; the patched original is untouched)."""
    return unpatch_timm(copy.deepcopy(mod))


_SET_BY_PATCH = frozenset([_unpatched_copy] + [r.replacement for r in RULES])


def is_patched(module: nn.Module) -> bool:
    """Whether ``module`` itself was patched by :func:`patch_timm`."""
    return _MARK in module.__dict__
