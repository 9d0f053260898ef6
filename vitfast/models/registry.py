"""The standard ViT names (timm's), one table, and ``create_model``.

Each entry is the constructor arguments of timm's model of that name plus the defaults of its
default pretrained weights (``num_classes``, ``mean``/``std``) and where those weights live on the
Hugging Face Hub (``hf_hub_id``), so a checkpoint of that name loads without overrides.
``tests/models/test_registry.py`` checks every entry against timm.
"""

from __future__ import annotations

import difflib
import os
from typing import Any, Dict, Optional

from .vit import FastViT
from .weights import load_weights

__all__ = ["MODEL_CONFIGS", "PRETRAINED", "create_model", "list_models"]

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

_SIZES = {
    "tiny": dict(embed_dim=192, depth=12, num_heads=3),
    "small": dict(embed_dim=384, depth=12, num_heads=6),
    "base": dict(embed_dim=768, depth=12, num_heads=12),
    "large": dict(embed_dim=1024, depth=24, num_heads=16),
    "huge": dict(embed_dim=1280, depth=32, num_heads=16),  # head dim 80
    "so400m": dict(embed_dim=1152, depth=27, num_heads=16, mlp_ratio=3.7362),  # SigLIP's shape-optimised, head dim 72
}
_FAMILIES = {
    "": dict(),
    "clip": dict(pre_norm=True, norm_eps=1e-5, mean=CLIP_MEAN, std=CLIP_STD),
    "clip_quickgelu": dict(pre_norm=True, norm_eps=1e-5, mean=CLIP_MEAN, std=CLIP_STD, act_layer="quick_gelu"),
    "siglip": dict(class_token=False, global_pool="map"),  # attention-pooling head
    "reg4_gap": dict(class_token=False, no_embed_class=True, global_pool="avg", reg_tokens=4),
    "reg4_dinov2": dict(reg_tokens=4, no_embed_class=True, init_values=1e-5, num_classes=0,
                        mean=IMAGENET_MEAN, std=IMAGENET_STD),
}
_INET = dict(mean=IMAGENET_MEAN, std=IMAGENET_STD)
_HALF = dict(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))

# (size, patch, family, img_size, default pretrained tag or None, overrides from that tag's config)
_TABLE = [
    ("tiny", 16, "", 224, "augreg_in21k_ft_in1k", {}),
    ("tiny", 16, "", 384, "augreg_in21k_ft_in1k", {}),
    ("small", 32, "", 224, "augreg_in21k_ft_in1k", {}),
    ("small", 32, "", 384, "augreg_in21k_ft_in1k", {}),
    ("small", 16, "", 224, "augreg_in21k_ft_in1k", {}),
    ("small", 16, "", 384, "augreg_in21k_ft_in1k", {}),
    ("small", 8, "", 224, "dino", dict(num_classes=0, **_INET)),
    ("base", 32, "", 224, "augreg_in21k_ft_in1k", {}),
    ("base", 32, "", 384, "augreg_in21k_ft_in1k", {}),
    ("base", 16, "", 224, "augreg2_in21k_ft_in1k", {}),
    ("base", 16, "", 384, "augreg_in21k_ft_in1k", {}),
    ("base", 8, "", 224, "augreg2_in21k_ft_in1k", {}),
    ("large", 32, "", 224, "orig_in21k", dict(num_classes=0)),
    ("large", 32, "", 384, "orig_in21k_ft_in1k", {}),
    ("large", 16, "", 224, "augreg_in21k_ft_in1k", {}),
    ("large", 16, "", 384, "augreg_in21k_ft_in1k", {}),
    ("large", 14, "", 224, None, {}),
    ("huge", 14, "", 224, "orig_in21k", dict(num_classes=0)),
    ("base", 16, "reg4_gap", 256, None, {}),
    ("small", 14, "reg4_dinov2", 518, "lvd142m", {}),
    ("base", 14, "reg4_dinov2", 518, "lvd142m", {}),
    ("large", 14, "reg4_dinov2", 518, "lvd142m", {}),
    ("base", 32, "clip", 224, "laion2b_ft_in12k_in1k", {}),
    ("base", 32, "clip", 256, "datacompxl", dict(num_classes=512)),
    ("base", 32, "clip", 384, "laion2b_ft_in12k_in1k", {}),
    ("base", 32, "clip", 448, "laion2b_ft_in12k_in1k", {}),
    ("base", 16, "clip", 224, "laion2b_ft_in12k_in1k", {}),
    ("base", 16, "clip", 384, "laion2b_ft_in12k_in1k", {}),
    ("large", 14, "clip", 224, "laion2b_ft_in12k_in1k", _HALF),
    ("large", 14, "clip", 336, "laion2b_ft_in12k_in1k", _HALF),
    ("huge", 14, "clip", 224, "laion2b_ft_in12k_in1k", {}),
    ("huge", 14, "clip", 336, "laion2b_ft_in12k_in1k", {}),
    ("huge", 14, "clip", 378, "dfn5b", dict(num_classes=1024)),
    ("base", 16, "siglip", 224, "v2_webli", dict(num_classes=0)),
    ("base", 16, "siglip", 256, "v2_webli", dict(num_classes=0)),
    ("base", 16, "siglip", 384, "v2_webli", dict(num_classes=0)),
    ("base", 16, "siglip", 512, "v2_webli", dict(num_classes=0)),
    ("large", 16, "siglip", 256, "v2_webli", dict(num_classes=0)),
    ("large", 16, "siglip", 384, "v2_webli", dict(num_classes=0)),
    ("so400m", 14, "siglip", 224, "v2_webli", dict(num_classes=0)),
    ("base", 32, "clip_quickgelu", 224, "laion400m_e32", dict(num_classes=512)),
    ("base", 16, "clip_quickgelu", 224, "metaclip_2pt5b", dict(num_classes=512)),
    ("large", 14, "clip_quickgelu", 224, "dfn2b", dict(num_classes=768)),
    ("large", 14, "clip_quickgelu", 336, "openai", dict(num_classes=768)),
    ("huge", 14, "clip_quickgelu", 224, "dfn5b", dict(num_classes=1024)),
    ("huge", 14, "clip_quickgelu", 378, "dfn5b", dict(num_classes=1024)),
]

MODEL_CONFIGS: Dict[str, Dict[str, Any]] = {}
PRETRAINED: Dict[str, Optional[str]] = {}  # name -> Hugging Face Hub repo of timm's default weights
for _size, _patch, _family, _img, _tag, _over in _TABLE:
    _name = f"vit_{_size}_patch{_patch}_{_family + '_' if _family else ''}{_img}"
    if _family == "reg4_dinov2":
        _name = f"vit_{_size}_patch{_patch}_reg4_dinov2"
    # a pretrained tag whose files carry another model's name (e.g. the quickgelu CLIP weights)
    _file = _name.replace("_quickgelu", "") if "quickgelu" in _family else _name
    MODEL_CONFIGS[_name] = dict(img_size=_img, patch_size=_patch, **_SIZES[_size], **{**_FAMILIES[_family], **_over})
    PRETRAINED[_name] = f"timm/{_file}.{_tag}" if _tag else None


def list_models(pattern: str = "*") -> list[str]:
    """The known names, sorted (``pattern``: an fnmatch filter like timm's, e.g. ``"*clip*"``)."""
    import fnmatch

    return sorted(n for n in MODEL_CONFIGS if fnmatch.fnmatch(n, pattern))


def _download(name: str) -> str:
    repo = PRETRAINED.get(name)
    hint = (f"pass checkpoint_path= a local .safetensors/.pth/.bin file (timm's weights for {name} are at "
            f"https://huggingface.co/{repo})" if repo else f"timm publishes no default weights for {name}; pass "
            "checkpoint_path= a local .safetensors/.pth/.bin file")
    if repo is None:
        raise ValueError(f"vitfast.create_model({name!r}, pretrained=True): {hint}.")
    try:
        from huggingface_hub import hf_hub_download

        return hf_hub_download(repo, "model.safetensors")
    except Exception as e:  # offline, no huggingface_hub, gated repo, ...
        raise RuntimeError(
            f"vitfast.create_model({name!r}, pretrained=True): could not fetch {repo} from the Hugging Face Hub "
            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); {hint}."
        ) from e


def _timm():
    try:
        import timm  # noqa: F401
        from timm.models import _builder

        return _builder
    except ImportError:
        return None


def pretrained_cfg_for(name: str, model: FastViT, overlay: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """timm's ``pretrained_cfg`` for ``name`` (its default tag, ``overlay`` applied), as
    ``timm.create_model(name)`` sets it; without timm, the same keys from the table."""
    builder = _timm()
    if builder is not None:
        try:
            return builder.resolve_pretrained_cfg(name, pretrained_cfg_overlay=overlay).to_dict()
        except Exception:  # a name this timm does not know: the table's values below
            pass
    cfg = dict(model.pretrained_cfg)
    repo = PRETRAINED.get(name)
    cfg.update(architecture=name, hf_hub_id=repo, tag=repo.rsplit(".", 1)[-1] if repo else None,
               input_size=(model.in_chans, *model.patch_embed.img_size), num_classes=MODEL_CONFIGS[name].get(
                   "num_classes", 1000))
    cfg.update(overlay or {})
    return cfg


def _load_pretrained(model: FastViT, name: str, num_classes_given: bool) -> None:
    """timm's own loader on the FastViT (the state-dict names are timm's): the Hugging Face Hub
    cache, ``pretrained_cfg_overlay=dict(file=...)``, offline mode and the position-embedding
    resampling behave exactly as ``timm.create_model(name, pretrained=True)``."""
    builder = _timm()
    if builder is None:  # no timm: the Hub file directly
        load_weights(model, _download(name), new_head=num_classes_given)
        return
    from timm.models.vision_transformer import checkpoint_filter_fn

    cfg = model.pretrained_cfg
    if not any(cfg.get(k) for k in ("file", "state_dict", "hf_hub_id", "url")):
        raise ValueError(f"vitfast.create_model({name!r}, pretrained=True): timm publishes no default weights for "
                         f"{name}; pass checkpoint_path= a local .safetensors/.pth/.bin file.")
    try:
        builder.load_pretrained(model, pretrained_cfg=cfg, num_classes=model.num_classes, in_chans=model.in_chans,
                                filter_fn=checkpoint_filter_fn, strict=model.num_classes == cfg.get("num_classes"))
    except Exception as e:
        fetching = isinstance(e, (OSError, ConnectionError)) or type(e).__module__.startswith(
            ("huggingface_hub", "requests", "urllib3", "httpx"))
        if not fetching:
            raise
        where = cfg.get("file") or cfg.get("hf_hub_id") or cfg.get("url")
        raise RuntimeError(
            f"vitfast.create_model({name!r}, pretrained=True): could not fetch {where} ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}); pass checkpoint_path= a local .safetensors/.pth/.bin "
            f"file, or pretrained_cfg_overlay=dict(file=...)."
        ) from e


def _features(model: FastViT, out_indices, feature_cls: str, **feature_kw) -> Any:
    """timm's feature wrapper around the model, as ``timm.create_model(..., features_only=True)``."""
    builder = _timm()
    if builder is None:
        raise ImportError("vitfast.create_model(features_only=True) wraps the model with timm's feature getter: "
                          "pip install timm")
    from timm.models._features import FeatureGetterNet

    if str(feature_cls).lower() != "getter":
        raise ValueError(f"vitfast.create_model: feature_cls={feature_cls!r}; a ViT takes 'getter' "
                         "(timm's forward_intermediates wrapper), as timm's ViTs do")
    cfg = model.pretrained_cfg
    wrapped = FeatureGetterNet(model, out_indices=out_indices, **feature_kw)
    wrapped.in_chans = model.in_chans
    wrapped.pretrained_cfg = builder.pretrained_cfg_for_features(cfg)
    return wrapped


def create_model(
    name: str, pretrained: bool = False, checkpoint_path: Optional[str] = None, *,
    pretrained_cfg_overlay: Optional[Dict[str, Any]] = None, features_only: bool = False,
    out_indices: Any = 3, feature_cls: str = "getter", **overrides: Any
) -> Any:
    """Build a FastViT by timm's model name, with constructor arguments overridden.

    ``checkpoint_path`` loads a ``.safetensors``/``.pth``/``.bin`` file in timm, torchvision or
    Hugging Face key layout (detected). ``pretrained=True`` without it loads timm's default
    weights through timm's own machinery (Hugging Face Hub cache, ``HF_HUB_OFFLINE``,
    ``pretrained_cfg_overlay=dict(file=...)``), as ``timm.create_model(name, pretrained=True)``.
    Overriding ``num_classes`` keeps the checkpoint's body and leaves the new head freshly
    initialised (as timm does). ``features_only=True`` returns timm's feature getter
    (``out_indices``: the last n blocks or a list; NCHW maps) around the model.
    The model's ``pretrained_cfg`` (and ``default_cfg``) is timm's for that name.
    """
    if name not in MODEL_CONFIGS:
        close = difflib.get_close_matches(name, MODEL_CONFIGS, n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise ValueError(f"vitfast.create_model: unknown model {name!r}.{hint} See vitfast.list_models().")
    cfg = {**MODEL_CONFIGS[name], **overrides}
    for stat in ("mean", "std"):
        # the table's (RGB) statistics do not fit another in_chans: FastViT's default, 0.5 a channel
        # (timm keeps its 3-value pretrained_cfg, which is not applied to the model)
        if stat not in overrides and cfg.get(stat) is not None and len(cfg[stat]) != cfg.get("in_chans", 3):
            del cfg[stat]
    model = FastViT(**cfg)
    model.pretrained_cfg = pretrained_cfg_for(name, model, pretrained_cfg_overlay)
    if checkpoint_path is not None:
        if not os.path.exists(checkpoint_path):
            raise FileNotFoundError(f"vitfast.create_model: checkpoint_path {checkpoint_path!r} does not exist")
        load_weights(model, checkpoint_path, new_head="num_classes" in overrides)
    elif pretrained:
        _load_pretrained(model, name, "num_classes" in overrides)
    if features_only:
        return _features(model, out_indices, feature_cls)
    return model
