"""timm's VisionTransformer weight-initialisation modes, for a FastViT or a timm VisionTransformer.

``init_vit_weights(model, mode)`` is timm's ``VisionTransformer.init_weights(mode)``: the
positional embedding and the class / register tokens first, then every submodule depth-first,
children before their parent (timm's ``named_apply``; the model itself is left out), then
:func:`fix_init_weight` with ``fix_init``. The walk draws random numbers in timm's order, so
every mode gives timm's tensors bit for bit from the same seed, on either model (they share
module names and order).

``"skip"``, which timm's constructor also takes, is the constructor's to handle (nothing is
initialised). Modules the modes do not name get timm's fallback: ``init_weights()`` where they
have one, else ``reset_parameters()`` (LayerNorm to ones / zeros, LayerScale to its init value),
the latter only with ``needs_reset`` (the constructors pass False: their modules have just
initialised themselves).
"""

from __future__ import annotations

import math
from functools import partial
from typing import Callable, Iterator, Tuple

import torch
import torch.nn as nn

from ..modules.initializers import TRUNC2_STD, lecun_normal_, normal_clipped_, trunc_normal_tf_

__all__ = ["INIT_MODES", "TRUNC2_STD", "init_vit_weights", "init_module_default", "fix_init_weight",
           "lecun_normal_", "normal_clipped_", "trunc_normal_tf_"]

INIT_MODES = ("", "jax", "jax_nlhb", "moco", "reset")


def _fallback(m: nn.Module, reset_only: bool = False, needs_reset: bool = True) -> None:
    """timm's rule for modules a mode does not name: init_weights(), else reset_parameters() (with
    ``needs_reset``)."""
    if not reset_only and hasattr(m, "init_weights"):
        m.init_weights()
    elif not needs_reset:
        return
    elif hasattr(m, "reset_parameters"):
        m.reset_parameters()


def _init_default(m: nn.Module, name: str, needs_reset: bool = True) -> None:
    if isinstance(m, nn.Linear):
        normal_clipped_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    else:  # the patch convolution included: PyTorch's default (kaiming-uniform), as timm's
        _fallback(m, needs_reset=needs_reset)


def init_module_default(m: nn.Module) -> None:
    """One module as timm's default mode initialises it (timm's ``init_weights_vit_timm``, what
    ``VisionTransformer._init_weights(m)`` does)."""
    with torch.no_grad():
        _init_default(m, "")


def _init_jax(m: nn.Module, name: str, nlhb: bool, needs_reset: bool = True) -> None:
    if isinstance(m, nn.Linear):
        if name.startswith("head"):
            nn.init.zeros_(m.weight)
            if m.bias is not None:  # -log(classes): the first softmax is uniform
                m.bias.fill_(-math.log(m.out_features) if nlhb else 0.0)
            return
        nn.init.xavier_uniform_(m.weight)
        if m.bias is not None:
            nn.init.normal_(m.bias, std=1e-6) if "mlp" in name else nn.init.zeros_(m.bias)
    elif isinstance(m, nn.Conv2d):
        lecun_normal_(m.weight)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    else:
        _fallback(m, needs_reset=needs_reset)


def _init_moco(m: nn.Module, name: str, needs_reset: bool = True) -> None:
    if isinstance(m, nn.Linear):
        if "qkv" in name:  # xavier-uniform as if q, k and v were three (dim, dim) layers
            bound = math.sqrt(6.0 / float(m.weight.shape[0] // 3 + m.weight.shape[1]))
            nn.init.uniform_(m.weight, -bound, bound)
        else:
            nn.init.xavier_uniform_(m.weight)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    else:  # the patch convolution included: PyTorch's default (moco-v3 fixes it; timm does not)
        _fallback(m, needs_reset=needs_reset)


def _init_reset(m: nn.Module, name: str, needs_reset: bool = True) -> None:
    _fallback(m, reset_only=True, needs_reset=needs_reset)


def _module_init(mode: str) -> Callable[..., None]:
    if mode.startswith("jax"):
        return partial(_init_jax, nlhb=mode == "jax_nlhb")
    return {"": _init_default, "moco": _init_moco, "reset": _init_reset}[mode]


def _children_first(module: nn.Module, prefix: str = "") -> Iterator[Tuple[str, nn.Module]]:
    """(name, module) for every submodule, children before their parent, the root left out
    (timm's ``named_apply`` order)."""
    for child_name, child in module.named_children():
        name = f"{prefix}.{child_name}" if prefix else child_name
        yield from _children_first(child, name)
        yield name, child


def _check_mode(mode: str) -> str:
    if not isinstance(mode, str) or mode not in INIT_MODES:
        raise ValueError(f"mode (timm's weight_init) must be one of {list(INIT_MODES)}, got {mode!r}")
    return mode


@torch.no_grad()
def init_vit_weights(model: nn.Module, mode: str = "", *, fix_init: bool = False, needs_reset: bool = True) -> None:
    """Initialise ``model`` (a FastViT or a timm VisionTransformer) in place with timm's
    ``weight_init`` mode ``mode`` (one of :data:`INIT_MODES`); ``fix_init`` then scales each
    block's residual projections down (:func:`fix_init_weight`).

    - ``""``: timm's default: Linear weights N(0, .02) (timm's ``trunc_normal_``, bounds at +-2),
      zero biases, the patch convolution PyTorch's default;
    - ``"jax"``: Linear xavier-uniform, zero biases but N(0, 1e-6) in the MLPs, the head zero,
      the patch convolution lecun-normal with a zero bias;
    - ``"jax_nlhb"``: ``"jax"`` with the head bias -log(num_classes);
    - ``"moco"``: Linear xavier-uniform (qkv as three separate layers), zero biases;
    - ``"reset"``: every module's ``reset_parameters()`` (PyTorch's defaults).

    Every mode draws ``pos_embed`` ~ N(0, .02) and the class / register tokens ~ N(0, 1e-6) first
    and resets LayerNorms and LayerScales (with ``needs_reset``: the constructors pass False, their
    modules having just initialised themselves, as timm's). Parameters on the meta device are
    accepted (nothing is drawn); a model without a classifier (``num_classes=0``) is fine in every
    mode.
    """
    init = _module_init(_check_mode(mode))
    pos_embed = getattr(model, "pos_embed", None)
    if pos_embed is not None:
        normal_clipped_(pos_embed, std=0.02)
    for token in ("cls_token", "reg_token"):
        if getattr(model, token, None) is not None:
            nn.init.normal_(getattr(model, token), std=1e-6)
    for name, m in _children_first(model):
        init(m, name, needs_reset=needs_reset)
    if fix_init:
        fix_init_weight(model)


@torch.no_grad()
def fix_init_weight(model: nn.Module) -> None:
    """Divide each block's ``attn.proj`` and ``mlp.fc2`` weights by sqrt(2 * (layer_id + 1))
    (timm's ``fix_init``: the residual branches of deeper blocks start smaller)."""
    for layer_id, block in enumerate(model.blocks):
        scale = math.sqrt(2.0 * (layer_id + 1))
        block.attn.proj.weight.div_(scale)
        block.mlp.fc2.weight.div_(scale)
