"""Model weights into FastViT: reading checkpoint files, key layouts, loading (not training
state: resuming a training run is :func:`vitfast.training.resume_checkpoint`).

``.safetensors`` files are read with safetensors; ``.pth``/``.pt``/``.bin``/``.ckpt`` with
``torch.load(weights_only=True)`` (no code in a checkpoint is ever run). Wrappers such as
``{"state_dict": ...}``, ``{"model": ...}`` and the ``module.`` (DDP) / ``_orig_mod.``
(torch.compile) prefixes are removed, the key layout (timm, torchvision, Hugging Face) is
detected and converted, and anything that does not fit raises one error listing every missing,
unexpected and mis-shaped key.
"""

from __future__ import annotations

import os
import pickle
import re
from typing import Any, Dict, Mapping, Optional, Union

import torch
import torch.nn as nn

from ..modules.patch_embed import resample_abs_pos_embed

__all__ = ["read_state_dict", "load_weights", "load_checkpoint", "load_state_dict", "CheckpointMismatch",
           "detect_layout", "to_timm_state_dict"]
StateDict = Dict[str, torch.Tensor]

PathLike = Union[str, os.PathLike]
_TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")
_WRAPPERS = ("state_dict", "model", "module", "state_dict_ema", "model_ema")
_PREFIXES = ("module.", "_orig_mod.")


class CheckpointMismatch(ValueError):
    """A state dict does not fit the model: lists missing, unexpected and mis-shaped keys."""

    def __init__(self, who: str, missing, unexpected, mismatched):
        self.missing, self.unexpected, self.mismatched = list(missing), list(unexpected), list(mismatched)
        parts = []
        if self.missing:
            parts.append(f"missing keys ({len(self.missing)}): {', '.join(self.missing)}")
        if self.unexpected:
            parts.append(f"unexpected keys ({len(self.unexpected)}): {', '.join(self.unexpected)}")
        if self.mismatched:
            parts.append("mis-shaped keys ({}): {}".format(
                len(self.mismatched), ", ".join(f"{k} (checkpoint {c}, model {m})" for k, c, m in self.mismatched)))
        super().__init__(f"{who}: the state dict does not fit the model:\n  " + "\n  ".join(parts))


# ------------------------------------------------------------------------ key layouts
# (regex on the source key, timm key template); a None template drops the key.
_TORCHVISION_KEYS = [
    (r"class_token", "cls_token"),
    (r"conv_proj\.(weight|bias)", r"patch_embed.proj.\1"),
    (r"encoder\.pos_embedding", "pos_embed"),
    (r"encoder\.layers\.encoder_layer_(\d+)\.ln_1\.", r"blocks.\1.norm1."),
    (r"encoder\.layers\.encoder_layer_(\d+)\.ln_2\.", r"blocks.\1.norm2."),
    (r"encoder\.layers\.encoder_layer_(\d+)\.self_attention\.in_proj_(weight|bias)", r"blocks.\1.attn.qkv.\2"),
    (r"encoder\.layers\.encoder_layer_(\d+)\.self_attention\.out_proj\.", r"blocks.\1.attn.proj."),
    (r"encoder\.layers\.encoder_layer_(\d+)\.mlp\.(0|linear_1)\.", r"blocks.\1.mlp.fc1."),
    (r"encoder\.layers\.encoder_layer_(\d+)\.mlp\.(3|linear_2)\.", r"blocks.\1.mlp.fc2."),
    (r"encoder\.ln\.", "norm."),
    (r"heads\.head\.", "head."),
]
_HF_KEYS = [  # prefixes "vit." (ViTForImageClassification) are stripped first
    (r"embeddings\.cls_token", "cls_token"),
    (r"embeddings\.position_embeddings", "pos_embed"),
    (r"embeddings\.patch_embeddings\.projection\.", "patch_embed.proj."),
    (r"embeddings\.mask_token", None),
    (r"(?:encoder\.layer|layers)\.(\d+)\.layernorm_before\.", r"blocks.\1.norm1."),
    (r"(?:encoder\.layer|layers)\.(\d+)\.layernorm_after\.", r"blocks.\1.norm2."),
    (r"encoder\.layer\.(\d+)\.attention\.attention\.(query|key|value)\.", r"blocks.\1.attn.\2."),
    (r"layers\.(\d+)\.attention\.(q|k|v)_proj\.", r"blocks.\1.attn.\2."),
    (r"(?:encoder\.layer\.(\d+)\.attention\.output\.dense|layers\.(\d+)\.attention\.o_proj)\.", r"blocks.\1\2.attn.proj."),
    (r"(?:encoder\.layer\.(\d+)\.intermediate\.dense|layers\.(\d+)\.mlp\.fc1)\.", r"blocks.\1\2.mlp.fc1."),
    (r"(?:encoder\.layer\.(\d+)\.output\.dense|layers\.(\d+)\.mlp\.fc2)\.", r"blocks.\1\2.mlp.fc2."),
    (r"layernorm\.", "norm."),
    (r"pooler\.", None),  # ViTModel's tanh pooler is not part of timm's ViT: dropped
    (r"classifier\.", "head."),
]


def detect_layout(sd: Mapping[str, Any]) -> str:
    """``"timm"``, ``"torchvision"`` or ``"hf"`` from a state dict's keys (ValueError otherwise)."""
    keys = set(sd)
    if "patch_embed.proj.weight" in keys:
        return "timm"
    if "conv_proj.weight" in keys or "encoder.pos_embedding" in keys:
        return "torchvision"
    if any(k.endswith("embeddings.patch_embeddings.projection.weight") for k in keys):
        return "hf"
    sample = ", ".join(sorted(keys)[:8])
    raise ValueError(
        "vitfast: cannot tell the layout of this state dict: expected timm ('patch_embed.proj.weight'), "
        "torchvision ('conv_proj.weight') or Hugging Face ('embeddings.patch_embeddings.projection.weight') "
        f"keys; it has {len(keys)} keys, e.g. {sample}"
    )


def _rename(sd: Mapping[str, torch.Tensor], table) -> StateDict:
    out: StateDict = {}
    for key, value in sd.items():
        for pattern, template in table:
            m = re.fullmatch(pattern + r"(.*)", key)
            if m:
                if template is not None:
                    out[m.expand(template) + m.groups()[-1]] = value
                break
        else:
            out[key] = value  # kept: reported as unexpected when loaded
    return out


def _merge_qkv(sd: StateDict) -> StateDict:
    """blocks.i.attn.{q,query}.* + k + v -> blocks.i.attn.qkv.* (q, k, v stacked: timm's order)."""
    out = dict(sd)
    for key in [k for k in sd if re.fullmatch(r"blocks\.\d+\.attn\.(q|query)\.(weight|bias)", k)]:
        base, _, suffix = key.rsplit(".", 2)
        parts = []
        for names in (("q", "query"), ("k", "key"), ("v", "value")):
            part = next((f"{base}.{n}.{suffix}" for n in names if f"{base}.{n}.{suffix}" in sd), None)
            if part is None:
                raise ValueError(f"vitfast.from_hf: {key} has no matching {names[0]}/{names[1]} {suffix} in the state dict")
            parts.append(out.pop(part))
        out[f"{base}.qkv.{suffix}"] = torch.cat(parts, dim=0)
    return out


def to_timm_state_dict(sd: Mapping[str, torch.Tensor], layout: Optional[str] = None) -> StateDict:
    """A timm/torchvision/Hugging Face ViT state dict in timm's key layout."""
    layout = layout or detect_layout(sd)
    if layout == "timm":
        return dict(sd)
    if layout == "torchvision":
        if any(k.startswith("heads.pre_logits") for k in sd):
            raise ValueError("vitfast: torchvision ViTs with representation_size (heads.pre_logits) are not supported")
        if any(k.startswith("conv_proj.conv_") for k in sd):
            raise ValueError("vitfast: torchvision ViTs with a convolutional stem (conv_stem_configs) are not supported")
        return _rename(sd, _TORCHVISION_KEYS)
    if layout == "hf":
        stripped = {k[4:] if k.startswith("vit.") else k: v for k, v in sd.items()}
        return _merge_qkv(_rename(stripped, _HF_KEYS))
    raise ValueError(f"vitfast: layout must be 'timm', 'torchvision' or 'hf', got {layout!r}")


def read_state_dict(path: PathLike) -> Dict[str, torch.Tensor]:
    """A flat ``{name: tensor}`` dict (on the CPU) from a checkpoint file."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"vitfast: checkpoint {path!r} does not exist")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        try:
            sd = load_file(path, device="cpu")
        except Exception as e:  # SafetensorError (not a ValueError) for a corrupt or truncated file
            raise ValueError(f"vitfast: could not read {path!r} as safetensors ({type(e).__name__}: {e})") from e
    elif path.endswith(_TORCH_SUFFIXES):
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            raise ValueError(_refused_pickle_message(path, e)) from e
        except Exception as e:
            raise ValueError(f"vitfast: could not read {path!r} with torch.load(weights_only=True) "
                             f"({type(e).__name__}: {_first_line(e)})") from e
    else:
        raise ValueError(f"vitfast: checkpoint {path!r} must end in .safetensors or one of {', '.join(_TORCH_SUFFIXES)}")
    return unwrap_state_dict(sd, path)


def _first_line(e: BaseException) -> str:
    return next((ln.strip() for ln in str(e).splitlines() if ln.strip()), type(e).__name__)


def _refused_pickle_message(path: str, e: BaseException) -> str:
    """torch.load(weights_only=True) refused the file: it would have run or built arbitrary
    Python objects. Say so plainly (torch's own text suggests weights_only=False)."""
    detail = next((ln.strip() for ln in str(e).splitlines() if "Unsupported global" in ln or "Unsupported operand" in ln
                   or "WeightsUnpickler error" in ln), _first_line(e))
    detail = re.sub(r"\x1b\[[0-9;]*m", "", detail).split(". ")[0].rstrip(".")
    return (f"vitfast: refused to load {path!r}: it holds pickled Python objects other than tensors and plain "
            f"containers ({detail}). vitfast reads checkpoints with torch.load(weights_only=True) and never runs "
            "code stored in a checkpoint. Save the weights alone (torch.save(model.state_dict(), path)) or as "
            ".safetensors; only if you trust the file's source, load it yourself and pass the state dict to "
            "load_checkpoint.")


def unwrap_state_dict(sd, where: str = "state dict") -> Dict[str, torch.Tensor]:
    """Remove ``{"state_dict": ...}``-style wrappers and ``module.``/``_orig_mod.`` prefixes."""
    while isinstance(sd, Mapping) and not any(isinstance(v, torch.Tensor) for v in sd.values()):
        inner = next((sd[k] for k in _WRAPPERS if isinstance(sd.get(k), Mapping)), None)
        if inner is None:
            raise ValueError(f"vitfast: {where} holds no tensors (top-level keys: {', '.join(map(str, list(sd)[:10]))})")
        sd = inner
    if not isinstance(sd, Mapping):
        raise TypeError(f"vitfast: {where} must be a mapping of parameter names to tensors, got {type(sd).__name__}")
    out = {}
    for k, v in sd.items():
        if not isinstance(v, torch.Tensor):
            continue  # e.g. an epoch counter next to the weights
        for p in _PREFIXES:
            while k.startswith(p):
                k = k[len(p):]
        out[k] = v
    return out


def _fit_pos_embed(model: nn.Module, sd: Dict[str, torch.Tensor]) -> None:
    """Resample a checkpoint's pos_embed to the model's grid (timm does the same on load)."""
    pe = sd.get("pos_embed")
    target = getattr(model, "pos_embed", None)
    if pe is None or target is None or pe.shape == target.shape or pe.dim() != 3 or pe.shape[-1] != target.shape[-1]:
        return
    prefix = 0 if model.no_embed_class else model.num_prefix_tokens
    side = int(round((pe.shape[1] - prefix) ** 0.5))
    if side * side != pe.shape[1] - prefix:
        return  # not a square grid: reported as mis-shaped
    sd["pos_embed"] = resample_abs_pos_embed(pe, model.patch_embed.grid_size, (side, side), prefix)


def load_state_dict(model: nn.Module, sd: Mapping[str, torch.Tensor], *, new_head: bool = False,
                    who: str = "vitfast.load_state_dict") -> nn.Module:
    """Load a timm/torchvision/HF state dict into a FastViT, raising :class:`CheckpointMismatch`
    listing every missing, unexpected and mis-shaped key. With ``new_head``, a classifier that does
    not fit (another ``num_classes``) is skipped and the model keeps its freshly initialised head, as
    timm does when ``num_classes`` is overridden."""
    sd = to_timm_state_dict(unwrap_state_dict(sd))
    expected = model.state_dict()
    head_fits = all(k in sd and sd[k].shape == v.shape for k, v in expected.items() if k.startswith("head.")) and \
        not any(k.startswith("head.") and k not in expected for k in sd)
    if new_head and not head_fits:
        sd = {k: v for k, v in sd.items() if not k.startswith("head.")}
        expected = {k: v for k, v in expected.items() if not k.startswith("head.")}
    _fit_pos_embed(model, sd)
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    mismatched = [(k, list(sd[k].shape), list(expected[k].shape)) for k in expected
                  if k in sd and sd[k].shape != expected[k].shape]
    if missing or unexpected or mismatched:
        raise CheckpointMismatch(who, missing, unexpected, mismatched)
    model.load_state_dict(sd, strict=not (new_head and not head_fits))
    return model


def load_weights(model: nn.Module, path_or_state_dict, *, new_head: bool = False) -> nn.Module:
    """Load model weights, a checkpoint file or an in-memory state dict in any supported layout,
    into ``model``."""
    if isinstance(path_or_state_dict, (str, os.PathLike)):
        sd, who = read_state_dict(path_or_state_dict), f"vitfast.load_weights({os.fspath(path_or_state_dict)!r})"
    else:
        sd, who = path_or_state_dict, "vitfast.load_weights"
    return load_state_dict(model, sd, new_head=new_head, who=who)


load_checkpoint = load_weights  # the name before 0.2 (vitfast.checkpoint.load_checkpoint)
