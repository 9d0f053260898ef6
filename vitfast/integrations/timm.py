"""Swap vitfast's kernels into a live timm VisionTransformer, in place, and back.

One table, :data:`RULES`: each rule names a timm class, the method of its instances that is
replaced, the vitfast function that replaces it, and what makes an instance unsuitable. Patching
binds the function to each matching instance (an instance attribute shadowing the class's
method); no module, Parameter or buffer is replaced, so an optimizer, a DDP wrapper or an EMA
built before patching stays valid. :func:`unpatch_timm` deletes those instance attributes.
"""

from __future__ import annotations

import copy
import functools
import types
from dataclasses import dataclass
from typing import Callable, List, Optional

import torch
import torch.nn as nn

from .._dispatch import warn_fallback_once
from ..modules.attention import attention_forward, check_backend
from ..modules.block import (block_forward, block_structure_problems, blocks_forward, calls_only_forward,
                             fx_symbolic_tracing)
from ..modules.patch_embed import check_images, embed_images

__all__ = ["patch_timm", "unpatch_timm", "is_patched", "RULES", "PatchRule"]

_MARK = "_vitfast_patched"  # instance attribute: {method name: backend}


# torch.fx.symbolic_trace / torchvision's create_feature_extractor: these calls are leaves of the
# graph, run with real tensors (input checks and the kernel-or-reference choice never see a Proxy)
torch.fx.wrap("check_images")
torch.fx.wrap("embed_images")
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


def _attention_forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None, is_causal: bool = False):
    """vitfast's attention for a timm ``Attention`` (see :func:`vitfast.modules.attention.attention_forward`)."""
    return attention_forward(self, x, getattr(self, _MARK)["forward"], attn_mask, is_causal)


def _block_forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None, is_causal: bool = False):
    """vitfast's fused block for a timm ``Block`` (see :func:`vitfast.modules.block.block_forward`);
    the attention runs on vitfast's kernel only if the attention rule patched it too."""
    attn_marks = self.attn.__dict__.get(_MARK, {})
    return block_forward(self, x, getattr(self, _MARK)["forward"], attn_mask, is_causal,
                         attn_backend=attn_marks.get("forward", "reference"))


def _vit_forward_features(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None, is_causal: bool = False):
    """timm's ``VisionTransformer.forward_features`` with the fused patch embedding; takes uint8
    images too (normalised with the model's ``pretrained_cfg`` mean/std)."""
    from timm.models._manipulate import checkpoint_seq

    pe = self.patch_embed
    check_images(x, pe.proj.in_channels, pe.patch_size[0], pe.img_size, self.dynamic_img_size, "patched timm ViT")
    cfg = getattr(self, "pretrained_cfg", None) or {}
    chans = pe.proj.in_channels  # not x.shape[1]: x may be an FX Proxy
    mean, std = cfg.get("mean", (0.5,) * chans), cfg.get("std", (0.5,) * chans)
    x = embed_images(
        x, pe.proj, cls_token=self.cls_token, reg_token=self.reg_token, pos_embed=self.pos_embed,
        no_embed_class=self.no_embed_class, grid_size=pe.grid_size, mean=mean, std=std,
        backend=getattr(self, _MARK)["forward_features"],
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
    if "forward" not in marks or type(blk) is not _timm_block() \
            or getattr(blk.__dict__.get("forward"), "__func__", None) is not _block_forward:
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
            if problems:
                skipped.append(f"{name or type(mod).__name__}: {'; '.join(problems)}")
                continue
            mod.__dict__.setdefault(_MARK, {})[rule.method] = backend
            setattr(mod, rule.method, types.MethodType(rule.replacement, mod))
            # torch.jit.script: the vitfast methods are not scriptable; script an unpatched copy
            mod.__dict__[_SCRIPTABLE] = functools.partial(_unpatched_copy, mod)
    if not matched and any(flags.values()):
        wanted = ", ".join(cls.__name__ for _, cls in rules)
        raise TypeError(f"vitfast.patch_timm: {type(model).__name__} holds no timm module to patch ({wanted})")
    if skipped:
        warn_fallback_once("patch_timm", skipped, fallback="timm (left unpatched)")
    return model


def unpatch_timm(model: nn.Module) -> nn.Module:
    """Undo :func:`patch_timm`: every patched instance gets its class's methods back."""
    for mod in model.modules():
        marks = mod.__dict__.pop(_MARK, None)
        for method in marks or ():
            mod.__dict__.pop(method, None)
        mod.__dict__.pop(_SCRIPTABLE, None)
    return model


_SCRIPTABLE = "__prepare_scriptable__"


def _unpatched_copy(mod: nn.Module) -> nn.Module:
    """What ``torch.jit.script`` compiles for a patched module: a copy with timm's own methods
    (the same weights and mode; the patched original is untouched)."""
    return unpatch_timm(copy.deepcopy(mod))


def is_patched(module: nn.Module) -> bool:
    """Whether ``module`` itself was patched by :func:`patch_timm`."""
    return _MARK in module.__dict__
