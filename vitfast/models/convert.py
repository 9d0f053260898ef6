"""Conversions into FastViT: from a live timm / torchvision / Hugging Face ViT, or from their state dicts.

* :func:`from_timm` -- a timm ``VisionTransformer`` -> FastViT with the same config and weights.
* :func:`from_torchvision` -- torchvision's ``VisionTransformer`` (``vit_b_16``, ``vit_l_16``, ...).
* :func:`from_hf` -- Hugging Face ``ViTModel`` / ``ViTForImageClassification`` (transformers v4 and
  v5 key names; LayerNorm eps 1e-12; q, k, v concatenated into timm's ``qkv``).
* :func:`config_from_state_dict` -- a FastViT config from a (timm-layout) state dict.

Key layouts and weight loading live in :mod:`vitfast.models.weights`, which this module uses
(one way: weights knows nothing of the converters).
"""

from __future__ import annotations

import functools
import math
from typing import Any, Dict, List, Mapping, Optional

import torch
import torch.nn as nn

from .vit import FastViT
from .weights import detect_layout, load_state_dict, to_timm_state_dict

__all__ = ["from_timm", "from_torchvision", "from_hf", "detect_layout", "to_timm_state_dict",
           "config_from_state_dict", "default_num_heads"]

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
StateDict = Dict[str, torch.Tensor]

def default_num_heads(embed_dim: int) -> int:
    """The head count of the standard ViT sizes (head dim 64, except huge's 1280/16 = 80)."""
    if embed_dim == 1280:
        return 16
    if embed_dim % 64:
        raise ValueError(f"vitfast: cannot guess num_heads for embed_dim={embed_dim}; pass num_heads=")
    return embed_dim // 64


def mlp_ratio_for(hidden: int, dim: int) -> float:
    """The ``mlp_ratio`` with which timm's and FastViT's blocks (``int(dim * mlp_ratio)``) build an
    MLP ``hidden`` wide: ``hidden / dim``, or the next float up where that product rounds below
    ``hidden`` (e.g. 240 / 176)."""
    ratio = hidden / dim
    return ratio if int(dim * ratio) == hidden else math.nextafter(ratio, math.inf)


def config_from_state_dict(sd: Mapping[str, torch.Tensor], num_heads: Optional[int] = None, **overrides) -> dict:
    """FastViT constructor arguments read off a timm-layout state dict's keys and shapes.

    What the weights cannot say (num_heads, norm eps, activation, normalisation statistics) comes
    from ``num_heads``/``overrides`` or the standard ViT's defaults. Pooling: "token" with a class
    token, else "avg"; an ``fc_norm`` means timm's ``global_pool="avg"`` (its default ``fc_norm=None``
    puts the final norm there only for avg/max pooling), class token or not.
    """
    for key in ("patch_embed.proj.weight", "pos_embed"):
        if key not in sd:
            raise ValueError(f"vitfast: the state dict has no {key!r}; cannot infer the architecture")
    D, C, p, _ = sd["patch_embed.proj.weight"].shape
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    class_token = "cls_token" in sd
    reg_tokens = sd["reg_token"].shape[1] if "reg_token" in sd else 0
    prefix = int(class_token) + reg_tokens
    n_pos = sd["pos_embed"].shape[1]
    side = int(round(n_pos**0.5))
    no_embed_class = prefix > 0 and side * side == n_pos
    if not no_embed_class:
        side = int(round((n_pos - prefix) ** 0.5))
        if side * side != n_pos - prefix:
            raise ValueError(f"vitfast: pos_embed has {n_pos} positions: not a square grid (with or without "
                             f"{prefix} prefix tokens); pass img_size=")
    cfg = dict(
        img_size=side * p, patch_size=p, in_chans=C, embed_dim=D, depth=depth,
        num_heads=num_heads or default_num_heads(D),
        num_classes=sd["head.weight"].shape[0] if "head.weight" in sd else 0,
        mlp_ratio=mlp_ratio_for(sd["blocks.0.mlp.fc1.weight"].shape[0], D),
        qkv_bias="blocks.0.attn.qkv.bias" in sd, qk_norm="blocks.0.attn.q_norm.weight" in sd,
        proj_bias="blocks.0.attn.proj.bias" in sd,
        init_values=1e-5 if "blocks.0.ls1.gamma" in sd else None,
        class_token=class_token, reg_tokens=reg_tokens, no_embed_class=no_embed_class,
        pre_norm="norm_pre.weight" in sd, final_norm="norm.weight" in sd or "fc_norm.weight" in sd,
        fc_norm="fc_norm.weight" in sd,
    )
    if "attn_pool.latent" in sd:  # SigLIP's attention pooling head
        cfg["global_pool"] = "map"
    elif not class_token or cfg["fc_norm"]:  # e.g. MAE-style fine-tunes: class token, avg pooling, fc_norm
        cfg["global_pool"] = "avg"
    cfg.update(overrides)
    return cfg


def _build(cfg: dict, sd: StateDict, like: Optional[torch.Tensor], who: str) -> FastViT:
    model = FastViT(**cfg)
    if like is not None:
        model = model.to(device=like.device, dtype=like.dtype)
    load_state_dict(model, sd, who=who)
    return model


# ------------------------------------------------------------------------------- timm
def _timm_problems(model: nn.Module) -> List[str]:
    from timm.layers import Attention as TimmAttention, Mlp as TimmMlp, PatchEmbed as TimmPatchEmbed
    from timm.models.vision_transformer import Block as TimmBlock

    problems = []
    ap = getattr(model, "attn_pool", None)
    if ap is not None and not _is_map_pool(ap, model):
        problems.append(f"global_pool={model.global_pool!r} (attention pooling other than timm's 'map' latent pool)")
    if getattr(model, "pos_embed", None) is None:
        problems.append("no learned pos_embed (pos_embed='none')")
    pd = model.patch_drop
    if not isinstance(pd, nn.Identity) and (type(pd).__name__ != "PatchDropout" or pd.ordered
                                            or pd.num_prefix_tokens != model.num_prefix_tokens):
        problems.append("a patch dropout other than timm's PatchDropout of patch_drop_rate (ordered, other prefix)")
    pe = model.patch_embed
    if type(pe) is not TimmPatchEmbed or not isinstance(pe.norm, nn.Identity) or pe.dynamic_img_pad:
        problems.append("a patch embedding other than timm's plain PatchEmbed (embed_norm_layer, dynamic_img_pad, ...)")
    elif (pe.proj.bias is not None) == (not isinstance(model.norm_pre, nn.Identity)):
        problems.append("patch_embed.proj bias does not follow timm's default (bias = not pre_norm)")
    norms = [model.norm_pre, model.norm, model.fc_norm]
    for i, blk in enumerate(model.blocks):
        if type(blk) is not TimmBlock:
            problems.append(f"blocks.{i} is {type(blk).__name__}, not timm's Block")
            continue
        a, m = blk.attn, blk.mlp
        if type(a) is not TimmAttention or a.gate is not None or not isinstance(a.norm, nn.Identity):
            problems.append(f"blocks.{i}.attn is not timm's plain Attention (gated, scale_attn_norm or another class)")
        elif a.num_heads * a.head_dim != a.proj.in_features:
            problems.append(f"blocks.{i}.attn has attn_head_dim {a.head_dim} != embed_dim / num_heads")
        if type(m) is not TimmMlp or not isinstance(m.norm, nn.Identity) or type(m.act).__name__ not in _ACTS:
            problems.append(f"blocks.{i}.mlp is not timm's Mlp with GELU/QuickGELU and no scale_mlp_norm")
        norms += [blk.norm1, blk.norm2, a.q_norm, a.k_norm]
    for n in norms:
        if not isinstance(n, nn.Identity) and not (isinstance(n, nn.LayerNorm) and n.elementwise_affine):
            problems.append(f"norm layer {type(n).__name__} (FastViT uses LayerNorm)")
            break
    return problems


_ACTS = {"GELU": None, "QuickGELU": "quick_gelu", "GELUTanh": "gelu_tanh"}


def _is_map_pool(ap: nn.Module, model: nn.Module) -> bool:
    """timm's AttentionPoolLatent as VisionTransformer(global_pool="map") builds it (one latent,
    a q projection, no positional embedding or q/k norm, LayerNorm + MLP like the blocks'), which
    FastViT's attention pool computes."""
    from timm.layers import AttentionPoolLatent as TimmPool

    blk = model.blocks[0]
    return (type(ap) is TimmPool and ap.latent_len == 1 and ap.pos_embed is None and ap.pool == "token"
            and isinstance(ap.q, nn.Linear) and ap.q.bias is not None and ap.kv.bias is not None
            and isinstance(ap.q_norm, nn.Identity) and isinstance(ap.k_norm, nn.Identity) and ap.mlp is not None
            and ap.num_heads == blk.attn.num_heads and ap.latent_dim == model.embed_dim
            and isinstance(ap.norm, nn.LayerNorm) and ap.norm.eps == blk.norm1.eps
            and ap.mlp.fc1.out_features == blk.mlp.fc1.out_features
            and type(ap.mlp.act) is type(blk.mlp.act) and type(ap.mlp.act).__name__ in _ACTS
            and _act_name(ap.mlp.act) == _act_name(blk.mlp.act))


def _act_name(act: nn.Module) -> str:
    if type(act).__name__ == "GELU":
        return "gelu_tanh" if getattr(act, "approximate", "none") == "tanh" else "gelu"
    return _ACTS[type(act).__name__]


def from_timm(model: nn.Module, backend: str = "auto") -> FastViT:
    """A FastViT with the config and (copied) weights of a timm ``VisionTransformer``."""
    try:
        from timm.models.vision_transformer import VisionTransformer
    except ImportError as e:  # pragma: no cover
        raise ImportError("vitfast.from_timm needs timm installed") from e
    if type(model) is not VisionTransformer:
        raise TypeError(f"vitfast.from_timm: expected a timm VisionTransformer, got {type(model).__name__}")
    problems = _timm_problems(model)
    if problems:
        raise ValueError("vitfast.from_timm: this timm model uses features FastViT does not have:\n  - "
                         + "\n  - ".join(problems))
    blk = model.blocks[0]
    a, pe = blk.attn, model.patch_embed
    cfg = dict(
        img_size=tuple(pe.img_size), patch_size=pe.patch_size[0], in_chans=pe.proj.in_channels,
        num_classes=model.num_classes, global_pool=model.global_pool, embed_dim=model.embed_dim,
        depth=len(model.blocks), num_heads=a.num_heads,
        mlp_ratio=mlp_ratio_for(blk.mlp.fc1.out_features, model.embed_dim),
        qkv_bias=a.qkv.bias is not None, qk_norm=not isinstance(a.q_norm, nn.Identity),
        proj_bias=a.proj.bias is not None,
        init_values=getattr(blk.ls1, "init_values", 1e-5) if not isinstance(blk.ls1, nn.Identity) else None,
        class_token=model.has_class_token, no_embed_class=model.no_embed_class, reg_tokens=model.num_reg_tokens,
        pre_norm=not isinstance(model.norm_pre, nn.Identity),
        final_norm=not (isinstance(model.norm, nn.Identity) and isinstance(model.fc_norm, nn.Identity)),
        fc_norm=not isinstance(model.fc_norm, nn.Identity), pool_include_prefix=model.pool_include_prefix,
        dynamic_img_size=model.dynamic_img_size, drop_rate=model.head_drop.p, pos_drop_rate=model.pos_drop.p,
        patch_drop_rate=getattr(model.patch_drop, "prob", 0.0), proj_drop_rate=a.proj_drop.p,
        attn_drop_rate=a.attn_drop.p,
        drop_path_rate=float(f"{getattr(model.blocks[-1].drop_path1, 'drop_prob', 0.0):.6g}"),  # float32 linspace
        norm_eps=blk.norm1.eps, act_layer=_act_name(blk.mlp.act), backend=backend,
        # how init_weights() re-initialises it ("skip" builds say "reset", as timm's)
        weight_init=getattr(model, "weight_init_mode", ""), fix_init=getattr(model, "fix_init", False),
    )
    pcfg = getattr(model, "pretrained_cfg", None) or {}
    if pcfg.get("mean") is not None and len(pcfg["mean"]) == cfg["in_chans"]:
        cfg["mean"], cfg["std"] = tuple(pcfg["mean"]), tuple(pcfg["std"])
    out = _build(cfg, model.state_dict(), model.pos_embed, "vitfast.from_timm")
    if pcfg:
        out.pretrained_cfg = dict(pcfg)  # timm's own (default_cfg is the same dict)
    return out.train(model.training)


def to_timm(model: FastViT) -> nn.Module:
    """A timm ``VisionTransformer`` with this FastViT's configuration and (copied) weights: the
    plain-PyTorch model FastViT's reference path computes (same device, dtype, mode and
    ``pretrained_cfg``). ``torch.jit.script(fastvit)`` scripts this."""
    try:
        from timm.models.vision_transformer import VisionTransformer
    except ImportError as e:  # pragma: no cover
        raise ImportError("vitfast.to_timm needs timm installed") from e
    c = model.config
    t = VisionTransformer(
        img_size=c["img_size"], patch_size=model.patch_embed.patch_size[0], in_chans=model.in_chans,
        num_classes=model.num_classes, global_pool=model.global_pool, embed_dim=model.embed_dim,
        depth=len(model.blocks), num_heads=c["num_heads"], mlp_ratio=c["mlp_ratio"], qkv_bias=c["qkv_bias"],
        qk_norm=c["qk_norm"], proj_bias=c["proj_bias"], init_values=c["init_values"], class_token=model.has_class_token,
        no_embed_class=model.no_embed_class, reg_tokens=model.num_reg_tokens, pre_norm=c["pre_norm"],
        final_norm=c["final_norm"], fc_norm=c["fc_norm"], pool_include_prefix=model.pool_include_prefix,
        dynamic_img_size=model.dynamic_img_size, drop_rate=c["drop_rate"], pos_drop_rate=c["pos_drop_rate"],
        patch_drop_rate=c.get("patch_drop_rate", 0.0), proj_drop_rate=c["proj_drop_rate"],
        attn_drop_rate=c["attn_drop_rate"], drop_path_rate=c["drop_path_rate"],
        norm_layer=functools.partial(nn.LayerNorm, eps=c["norm_eps"]), act_layer=c["act_layer"], weight_init="skip",
    )
    if isinstance(model.norm, nn.Identity):  # pruned by prune_intermediate_layers(prune_norm=True)
        t.norm = nn.Identity()
    if isinstance(model.fc_norm, nn.Identity):
        t.fc_norm = nn.Identity()
    ref = model.pos_embed
    t = t.to(device=ref.device, dtype=ref.dtype)
    t.load_state_dict(model.state_dict())
    t.weight_init_mode, t.fix_init = model.weight_init_mode, model.fix_init  # what its init_weights() then uses
    t.pretrained_cfg = dict(model.pretrained_cfg)
    return t.train(model.training)


# ------------------------------------------------------------------------ torchvision
def from_torchvision(model_or_state_dict, num_heads: Optional[int] = None, backend: str = "auto") -> FastViT:
    """A FastViT from torchvision's ``VisionTransformer`` (or its state dict; then ``num_heads``
    defaults to the standard size's). torchvision's LayerNorm eps is 1e-6 and its weights expect
    ImageNet mean/std, which become the uint8 path's defaults."""
    if isinstance(model_or_state_dict, nn.Module):
        m = model_or_state_dict
        if getattr(m, "representation_size", None):
            raise ValueError("vitfast.from_torchvision: models with representation_size are not supported")
        sd, num_heads, like = m.state_dict(), m.encoder.layers[0].self_attention.num_heads, m.class_token
        training = m.training
    else:
        sd, like, training = dict(model_or_state_dict), None, False
    sd = to_timm_state_dict(sd, "torchvision")
    cfg = config_from_state_dict(sd, num_heads, norm_eps=1e-6, mean=IMAGENET_MEAN, std=IMAGENET_STD, backend=backend)
    return _build(cfg, sd, like, "vitfast.from_torchvision").train(training)


# ------------------------------------------------------------------------- Hugging Face
_HF_ACTS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "quick_gelu": "quick_gelu"}


def from_hf(model_or_state_dict, config=None, backend: str = "auto") -> FastViT:
    """A FastViT from Hugging Face's ``ViTModel`` / ``ViTForImageClassification`` (or a state dict
    with its ``ViTConfig``; without one the standard ViT sizes and HF's defaults are assumed).

    FastViT's ``forward_features`` equals ``ViTModel``'s ``last_hidden_state``; ViTModel's tanh
    pooler has no counterpart in timm's ViT and is dropped (``num_classes=0`` then).
    """
    if isinstance(model_or_state_dict, nn.Module):
        config = config or model_or_state_dict.config
        sd, like = model_or_state_dict.state_dict(), next(model_or_state_dict.parameters())
        training = model_or_state_dict.training
    else:
        sd, like, training = dict(model_or_state_dict), None, False
    sd = to_timm_state_dict(sd, "hf")
    over: Dict[str, Any] = dict(norm_eps=1e-12, backend=backend)
    num_heads = None
    if config is not None:
        act = getattr(config, "hidden_act", "gelu")
        if act not in _HF_ACTS:
            raise ValueError(f"vitfast.from_hf: hidden_act={act!r} is not supported (use one of {list(_HF_ACTS)})")
        num_heads = config.num_attention_heads
        over.update(norm_eps=config.layer_norm_eps, act_layer=_HF_ACTS[act])
        mean, std = getattr(config, "image_mean", None), getattr(config, "image_std", None)
        if mean is not None and std is not None:
            over.update(mean=tuple(mean), std=tuple(std))
    cfg = config_from_state_dict(sd, num_heads, **over)
    return _build(cfg, sd, like, "vitfast.from_hf").train(training)
