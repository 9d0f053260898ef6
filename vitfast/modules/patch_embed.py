"""Patch embedding with timm's names (``proj`` is a stride-p Conv2d), and :func:`embed_images`:
images -> tokens (normalisation, projection, class/register tokens, positional embedding) through
the fused ``vitfast.ops.patch_embed`` op, shared with the timm models that ``patch_timm`` patches."""

from __future__ import annotations

from typing import Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from .._dispatch import module_uses_kernel
from ..ops.patch_embed import patch_embed, patch_embed_fused_not_supported_reasons, patch_embed_not_supported_reasons
from ..ops.reference import normalize_images_ref

__all__ = ["PatchEmbed", "PatchDropout", "to_2tuple", "embed_images", "add_tokens", "images_for_proj",
           "resample_abs_pos_embed", "resample_patch_weight"]


def to_2tuple(x: Union[int, Sequence[int]]) -> Tuple[int, int]:
    return (int(x), int(x)) if isinstance(x, int) else tuple(int(v) for v in x)


def size_pair(v, name: str) -> Optional[Tuple[int, int]]:
    """An image or patch size as a pair of positive ints (None stays None)."""
    if v is None:
        return None
    pair = tuple(v) if isinstance(v, (tuple, list)) else (v, v) if hasattr(v, "__index__") else None
    if pair is None or len(pair) != 2 or not all(hasattr(x, "__index__") and int(x) > 0 for x in pair):
        raise ValueError(f"{name} must be a positive int or a pair of them (height, width), got {v!r}")
    return (int(pair[0]), int(pair[1]))


class PatchEmbed(nn.Module):
    """Holds the projection. The model normally runs it through ``vitfast.ops.patch_embed``, so
    that normalisation, class token and positional embedding are applied in the same op; it calls
    the module (timm's ``PatchEmbed.forward``: float images -> ``proj`` -> ``[B, N, D]`` tokens, or
    ``output_fmt``: "NHWC", "NLC", "NCL", "NCHW") when hooks, a compile or sharding are attached
    to it, or under ``torch.fx.symbolic_trace``. ``strict_img_size``: images must be ``img_size``
    (else any multiple of the patch size), as timm's."""

    def __init__(self, img_size=224, patch_size=16, in_chans: int = 3, embed_dim: int = 768, bias: bool = True,
                 output_fmt: Optional[str] = None, strict_img_size: bool = True):
        super().__init__()
        self.img_size = to_2tuple(img_size)
        self.patch_size = to_2tuple(patch_size)
        if self.patch_size[0] != self.patch_size[1]:
            raise ValueError(f"patch_size must be square, got {self.patch_size}")
        if self.img_size[0] % self.patch_size[0] or self.img_size[1] % self.patch_size[1]:
            raise ValueError(f"img_size {self.img_size} is not divisible by patch_size {self.patch_size}")
        if output_fmt not in (None,) + _FORMATS:
            raise ValueError(f"output_fmt must be one of {list(_FORMATS)} or None, got {output_fmt!r}")
        # timm's attributes: no output_fmt = flattened to [B, N, D] (output_fmt then reads NCHW)
        self.flatten = output_fmt is None
        self.output_fmt = output_fmt or "NCHW"
        self.strict_img_size = strict_img_size
        self.grid_size = (self.img_size[0] // self.patch_size[0], self.img_size[1] // self.patch_size[1])
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=self.patch_size, stride=self.patch_size, bias=bias)

    def set_input_size(self, img_size=None, patch_size=None) -> None:
        """timm's: a new image size and/or patch size. A new patch size resamples the projection
        (:func:`resample_patch_weight`, FlexiViT's pseudo-inverse), keeping its bias, device, dtype
        and ``requires_grad``. Checks everything before changing anything."""
        img_size = size_pair(img_size, "img_size") or self.img_size
        new_patch = size_pair(patch_size, "patch_size") or self.patch_size
        if new_patch[0] != new_patch[1]:
            raise ValueError(f"patch_size must be square, got {new_patch}")
        if img_size[0] % new_patch[0] or img_size[1] % new_patch[1]:
            raise ValueError(f"img_size {img_size} is not divisible by patch_size {new_patch}")
        if new_patch != self.patch_size:
            old = self.proj
            proj = nn.Conv2d(old.in_channels, old.out_channels, kernel_size=new_patch, stride=new_patch,
                             bias=old.bias is not None, device=old.weight.device, dtype=old.weight.dtype)
            with torch.no_grad():
                proj.weight.copy_(resample_patch_weight(old.weight, new_patch))
                proj.weight.requires_grad_(old.weight.requires_grad)
                if old.bias is not None:
                    proj.bias.copy_(old.bias)
                    proj.bias.requires_grad_(old.bias.requires_grad)
            self.proj = proj.train(old.training)
            self.patch_size = new_patch
        self.img_size = img_size
        self.grid_size = (img_size[0] // new_patch[0], img_size[1] // new_patch[1])
        self.num_patches = self.grid_size[0] * self.grid_size[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_images(x, self.proj.in_channels, self.patch_size[0], self.img_size, not self.strict_img_size,
                     "PatchEmbed")
        x = self.proj(x)
        if self.flatten or self.output_fmt == "NLC":
            return x.flatten(2).transpose(1, 2)
        if self.output_fmt == "NHWC":
            return x.permute(0, 2, 3, 1)
        return x.flatten(2) if self.output_fmt == "NCL" else x


_FORMATS = ("NCHW", "NHWC", "NLC", "NCL")


def resample_abs_pos_embed(
    pos_embed: torch.Tensor,
    new_size: Sequence[int],
    old_size: Sequence[int],
    num_prefix_tokens: int = 0,
    interpolation: str = "bicubic",
    antialias: bool = True,
) -> torch.Tensor:
    """Resize a ``[1, prefix + H*W, D]`` positional embedding to a new grid (timm's semantics:
    prefix entries are kept, the grid is interpolated in float32)."""
    new_size, old_size = tuple(new_size), tuple(old_size)
    if new_size == old_size:
        return pos_embed
    prefix, grid = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    if grid.shape[1] != old_size[0] * old_size[1]:
        raise ValueError(
            f"pos_embed has {grid.shape[1]} grid positions, expected {old_size[0]}x{old_size[1]} "
            f"(after {num_prefix_tokens} prefix tokens)"
        )
    D = pos_embed.shape[-1]
    g = grid.float().reshape(1, old_size[0], old_size[1], D).permute(0, 3, 1, 2)
    g = F.interpolate(g, size=new_size, mode=interpolation, antialias=antialias)
    g = g.permute(0, 2, 3, 1).reshape(1, -1, D).to(pos_embed.dtype)
    return torch.cat([prefix, g], dim=1) if num_prefix_tokens else g


def resample_patch_weight(weight: torch.Tensor, new_size: Sequence[int], interpolation: str = "bicubic",
                          antialias: bool = True) -> torch.Tensor:
    """A ``[D, C, p, p]`` patch projection resampled to ``new_size`` patches (FlexiViT,
    arXiv:2212.08013, as timm's ``resample_patch_embed``): with ``R`` the linear map that resizes a
    ``p x p`` patch to ``new_size`` (``interpolation``, ``antialias``), the new weights ``w'`` solve
    ``R^T w' = w`` in the least-squares sense (``w' = pinv(R^T) w``), so a patch resized to the new
    size projects as the original patch did. Computed in float32 (float64 stays float64), returned
    in the weight's dtype."""
    new_size, old_size = to_2tuple(new_size), tuple(weight.shape[-2:])
    if weight.dim() != 4:
        raise ValueError(f"weight must be [D, C, p, p], got shape {tuple(weight.shape)}")
    if new_size == old_size:
        return weight
    work = torch.float64 if weight.dtype == torch.float64 else torch.float32
    n_old = old_size[0] * old_size[1]
    basis = torch.eye(n_old, device=weight.device, dtype=work).reshape(n_old, 1, *old_size)
    resized = F.interpolate(basis, size=new_size, mode=interpolation, antialias=antialias, align_corners=False)
    R = resized.reshape(n_old, -1).t()  # [new p*p, old p*p]: column i is basis patch i resized
    D, C = weight.shape[:2]
    w = weight.reshape(D, C, n_old).to(work) @ torch.linalg.pinv(R)  # rows: w^T pinv(R) = (pinv(R^T) w)^T
    return w.reshape(D, C, *new_size).to(weight.dtype)


def patch_dropout(x: torch.Tensor, prob: float, num_prefix_tokens: int, ordered: bool, training: bool) -> torch.Tensor:
    """:class:`PatchDropout`'s computation (a leaf of ``torch.fx.symbolic_trace`` graphs: the token
    count it draws from is a real number there)."""
    if not training or prob == 0.0:
        return x
    n = num_prefix_tokens
    prefix, x = x[:, :n], x[:, n:]
    B, L = x.shape[:2]
    keep = torch.argsort(torch.randn(B, L, device=x.device), dim=-1)[:, : max(1, int(L * (1.0 - prob)))]
    if ordered:
        keep = keep.sort(dim=-1).values
    x = x.gather(1, keep.unsqueeze(-1).expand(-1, -1, *x.shape[2:]))
    return torch.cat((prefix, x), dim=1) if n else x


torch.fx.wrap("patch_dropout")


class PatchDropout(nn.Module):
    """timm's PatchDropout (arXiv:2212.00794): in training, each image keeps a random
    ``max(1, int(L * (1 - prob)))`` of its ``L`` patch tokens (``ordered``: in their original order),
    the ``num_prefix_tokens`` class/register tokens always; the identity in eval or at ``prob = 0``."""

    def __init__(self, prob: float = 0.5, num_prefix_tokens: int = 1, ordered: bool = False):
        super().__init__()
        if not 0.0 <= prob < 1.0:
            raise ValueError(f"patch_drop_rate must be in [0, 1), got {prob}")
        self.prob = float(prob)
        self.num_prefix_tokens = num_prefix_tokens
        self.ordered = ordered

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return patch_dropout(x, self.prob, self.num_prefix_tokens, self.ordered, self.training)

    def extra_repr(self) -> str:
        return f"prob={self.prob}, num_prefix_tokens={self.num_prefix_tokens}, ordered={self.ordered}"


def embed_images(
    images: torch.Tensor,
    proj: nn.Conv2d,
    *,
    cls_token: Optional[torch.Tensor],
    reg_token: Optional[torch.Tensor],
    pos_embed: Optional[torch.Tensor],
    no_embed_class: bool,
    grid_size: Tuple[int, int],
    mean: Optional[torch.Tensor] = None,
    std: Optional[torch.Tensor] = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Images ``[B, C, H, W]`` (uint8, normalised with mean/std; or float, used as is) -> tokens
    ``[B, prefix + N, D]`` with timm's VisionTransformer semantics (``patch_embed`` + ``_pos_embed``
    without its dropout). A grid other than ``grid_size`` resamples ``pos_embed`` bicubically."""
    p = proj.stride[0]
    gh, gw = images.shape[-2] // p, images.shape[-1] // p
    if images.dtype != torch.uint8:
        mean = std = None  # float images are taken as already normalised (timm's contract)
    w, b = proj.weight, proj.bias
    use_fused = backend != "reference" and module_uses_kernel("FastViT.patch_embed", backend, _reasons(images, w))
    if not use_fused:
        x = F.conv2d(images_for_proj(images, mean, std, w.dtype), w, b, stride=p).flatten(2).transpose(1, 2)
        return _add_tokens(x, (gh, gw), cls_token, reg_token, pos_embed, no_embed_class, grid_size)
    prefix = [t for t in (cls_token, reg_token) if t is not None]
    pos_embed = _grid_pos_embed(pos_embed, (gh, gw), grid_size, 0 if no_embed_class else _n_tokens(prefix))
    if reg_token is None:  # the op adds the class token and every position itself
        return patch_embed(images, w, b, cls_token=cls_token, pos_embed=pos_embed, mean=mean, std=std)
    x = patch_embed(images, w, b, pos_embed=pos_embed if no_embed_class else None, mean=mean, std=std)
    x = torch.cat([t.expand(x.shape[0], -1, -1) for t in prefix] + [x], dim=1)
    return x if no_embed_class or pos_embed is None else x + pos_embed


def images_for_proj(images: torch.Tensor, mean, std, dtype: torch.dtype) -> torch.Tensor:
    """What the projection takes: uint8 images normalised with ``mean``/``std``, float images as
    they are (already normalised, timm's contract), in ``dtype``."""
    if images.dtype == torch.uint8:
        return normalize_images_ref(images, mean, std, dtype=dtype)
    return images.to(dtype)


def add_tokens(
    x: torch.Tensor,
    *,
    cls_token: Optional[torch.Tensor],
    reg_token: Optional[torch.Tensor],
    pos_embed: Optional[torch.Tensor],
    no_embed_class: bool,
    grid_size: Tuple[int, int],
) -> torch.Tensor:
    """:class:`PatchEmbed`'s output -> the model's tokens ``[B, prefix + N, D]``: timm's
    ``VisionTransformer._pos_embed`` without its dropout. ``x``: ``[B, N, D]`` on ``grid_size``,
    or ``[B, H, W, D]`` (``output_fmt="NHWC"``, dynamic image size) on any grid."""
    grid = tuple(grid_size)
    if x.dim() == 4:
        grid = (x.shape[1], x.shape[2])
        x = x.flatten(1, 2)
    return _add_tokens(x, grid, cls_token, reg_token, pos_embed, no_embed_class, grid_size)


def _n_tokens(prefix) -> int:
    return sum(t.shape[1] for t in prefix)


def _grid_pos_embed(pos_embed, grid, grid_size, num_prefix_tokens: int):
    """``pos_embed`` for a ``grid`` of patches (resampled bicubically when it is not ``grid_size``)."""
    if pos_embed is not None and tuple(grid) != tuple(grid_size):
        return resample_abs_pos_embed(pos_embed, grid, grid_size, num_prefix_tokens)
    return pos_embed


def _add_tokens(x, grid, cls_token, reg_token, pos_embed, no_embed_class, grid_size) -> torch.Tensor:
    prefix = [t for t in (cls_token, reg_token) if t is not None]
    pos_embed = _grid_pos_embed(pos_embed, grid, grid_size, 0 if no_embed_class else _n_tokens(prefix))
    expanded = [t.expand(x.shape[0], -1, -1) for t in prefix]
    if pos_embed is None:
        return torch.cat(expanded + [x], dim=1)
    if no_embed_class:
        return torch.cat(expanded + [x + pos_embed], dim=1)
    return torch.cat(expanded + [x], dim=1) + pos_embed


def _reasons(images: torch.Tensor, weight: torch.Tensor) -> list:
    """Why no kernel can embed these images (empty: one can). On CUDA either the C++ op or the
    fused Triton kernel serves (patch_embed picks between them): the C++ extension missing, or
    built for another torch, leaves the Triton kernel."""
    reasons = patch_embed_not_supported_reasons(images, weight)
    if reasons and images.device.type == "cuda":
        fused = patch_embed_fused_not_supported_reasons(images, weight)
        reasons = [] if not fused else reasons + [f"fused Triton kernel: {r}" for r in fused]
    return reasons


def check_images(images, in_chans: int, patch: int, img_size: Tuple[int, int], dynamic: bool, who: str) -> None:
    """Clear errors for inputs no path can take (wrong rank, dtype, channels, size)."""
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"{who}: images must be a torch.Tensor, got {type(images).__name__}")
    if images.dim() != 4:
        raise ValueError(f"{who}: images must be [B, C, H, W], got shape {list(images.shape)}")
    if images.dtype != torch.uint8 and not images.is_floating_point():
        raise TypeError(f"{who}: images must be uint8 (raw pixels) or floating point, got {images.dtype}")
    if images.shape[1] != in_chans:
        raise ValueError(f"{who}: images have {images.shape[1]} channels, the model expects in_chans={in_chans}")
    H, W = images.shape[-2:]
    if dynamic:
        if H % patch or W % patch or H < patch or W < patch:
            raise ValueError(f"{who}: image size {H}x{W} is not a positive multiple of the patch size {patch}")
    elif (H, W) != tuple(img_size):
        raise ValueError(
            f"{who}: image size {H}x{W} does not match the model's img_size {img_size[0]}x{img_size[1]} "
            "(build it with dynamic_img_size=True to accept other sizes)"
        )


# torch.fx.symbolic_trace: a leaf of the graph (PatchEmbed.forward), run with real tensors
torch.fx.wrap("check_images")


def grid_of(images: torch.Tensor, patch: int) -> Tuple[int, int]:
    return images.shape[-2] // patch, images.shape[-1] // patch

