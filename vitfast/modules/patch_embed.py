"""Patch embedding with timm's names (``proj`` is a stride-p Conv2d)."""

from __future__ import annotations

from typing import Tuple, Union

import torch.nn as nn

__all__ = ["PatchEmbed", "to_2tuple"]


def to_2tuple(x: Union[int, Tuple[int, int]]) -> Tuple[int, int]:
    return (x, x) if isinstance(x, int) else tuple(x)


class PatchEmbed(nn.Module):
    """Holds the projection; the model runs it through ``vitfast.ops.patch_embed`` so that
    normalisation, class token and positional embedding are applied in the same op."""

    def __init__(self, img_size=224, patch_size=16, in_chans: int = 3, embed_dim: int = 768, bias: bool = True):
        super().__init__()
        self.img_size = to_2tuple(img_size)
        self.patch_size = to_2tuple(patch_size)
        if self.patch_size[0] != self.patch_size[1]:
            raise ValueError(f"patch_size must be square, got {self.patch_size}")
        if self.img_size[0] % self.patch_size[0] or self.img_size[1] % self.patch_size[1]:
            raise ValueError(f"img_size {self.img_size} is not divisible by patch_size {self.patch_size}")
        self.grid_size = (self.img_size[0] // self.patch_size[0], self.img_size[1] // self.patch_size[1])
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size, bias=bias)
