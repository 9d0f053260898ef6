"""FastViT: timm's VisionTransformer (constructor, state_dict keys, forward API) on vitfast's ops."""

from __future__ import annotations

import contextlib
from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from ..modules.attention import MODULE_BACKENDS, check_backend
from ..modules.attention_pool import AttentionPoolLatent
from ..modules.block import Block, blocks_forward, calls_only_forward, fx_symbolic_tracing
from ..modules.patch_embed import (PatchDropout, PatchEmbed, add_tokens, check_images, embed_images, grid_of,
                                   images_for_proj, resample_abs_pos_embed)
from .init import INIT_MODES, fix_init_weight, init_module_default, init_vit_weights

__all__ = ["FastViT", "BACKENDS", "INCEPTION_MEAN", "INCEPTION_STD"]

BACKENDS = MODULE_BACKENDS
INCEPTION_MEAN = (0.5, 0.5, 0.5)
INCEPTION_STD = (0.5, 0.5, 0.5)
POOLS = ("", "token", "avg", "max", "avgmax", "map")


# torch.fx.symbolic_trace / torchvision's create_feature_extractor: these calls are leaves of the
# graph, run with real tensors (input checks and the kernel-or-reference choice never see a Proxy)
torch.fx.wrap("check_images")
torch.fx.wrap("embed_images")
torch.fx.wrap("images_for_proj")
torch.fx.wrap("add_tokens")


def _take_indices(depth: int, indices: Optional[Union[int, Sequence[int]]]) -> Tuple[List[int], int]:
    """timm's feature_take_indices: None = all blocks, int n = the last n, a list = those (negatives ok)."""
    if indices is None:
        indices = depth
    if isinstance(indices, int):
        if not 0 < indices <= depth:
            raise ValueError(f"indices={indices} must be in 1..{depth} (the model has {depth} blocks)")
        take = list(range(depth - indices, depth))
    else:
        take = [i + depth if i < 0 else i for i in indices]
        bad = [i for i, t in zip(indices, take) if not 0 <= t < depth]
        if bad:
            raise ValueError(f"indices {bad} are out of range for {depth} blocks")
    return take, max(take)


def _pixel_stats_follow(module: "FastViT", incompatible_keys) -> None:
    module._place_pixel_stats()


class FastViT(nn.Module):
    """A Vision Transformer with timm's constructor arguments, state_dict keys and forward API.

    ``backend="auto"`` runs vitfast's kernels where they can serve the input and otherwise plain
    PyTorch, with a one-time warning naming why; ``"kernel"`` forces the kernels (raising
    :class:`vitfast._dispatch.KernelNotSupported` with every reason); ``"reference"`` is plain
    PyTorch everywhere (what the benchmarks compare against).

    Float images are taken as already normalised (as timm does); uint8 images are normalised
    inside the patch-embedding op with ``mean``/``std`` (default: the pretrained config's, 0.5).
    ``FastViT(**model.config)`` rebuilds the architecture.
    """

    def __init__(
        self,
        img_size: Union[int, Tuple[int, int]] = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        num_classes: int = 1000,
        global_pool: str = "token",
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        qk_norm: bool = False,
        proj_bias: bool = True,
        init_values: Optional[float] = None,
        class_token: bool = True,
        no_embed_class: bool = False,
        reg_tokens: int = 0,
        pre_norm: bool = False,
        final_norm: bool = True,
        fc_norm: Optional[bool] = None,
        pool_include_prefix: bool = False,
        dynamic_img_size: bool = False,
        drop_rate: float = 0.0,
        pos_drop_rate: float = 0.0,
        patch_drop_rate: float = 0.0,
        proj_drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        weight_init: str = "",
        fix_init: bool = False,
        norm_eps: float = 1e-6,
        act_layer: str = "gelu",
        mean: Optional[Sequence[float]] = None,
        std: Optional[Sequence[float]] = None,
        backend: str = "auto",
        device: Optional[Union[str, torch.device]] = None,
        dtype: Optional[torch.dtype] = None,
    ):
        super().__init__()
        if global_pool not in POOLS:
            raise ValueError(f"global_pool must be one of {list(POOLS)}, got {global_pool!r}")
        if global_pool == "token" and not class_token:
            raise ValueError("global_pool='token' needs class_token=True")
        for name, v in (("depth", depth), ("num_heads", num_heads), ("embed_dim", embed_dim)):
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if reg_tokens < 0:
            raise ValueError(f"reg_tokens must be >= 0, got {reg_tokens}")
        for name, v in (("mean", mean), ("std", std)):
            if v is not None and len(v) != in_chans:
                raise ValueError(f"{name} must have one value per channel (in_chans={in_chans}), got {tuple(v)}")
        backend = check_backend(backend)
        if weight_init not in INIT_MODES + ("skip",):
            raise ValueError(f"weight_init must be one of {list(INIT_MODES + ('skip',))}, got {weight_init!r}")
        if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise ValueError(f"dtype must be a floating-point torch.dtype, got {dtype!r}")
        # the architecture: where and in which dtype it is built are not part of it
        self.config = {k: v for k, v in locals().items()
                       if k not in ("self", "__class__", "name", "v", "device", "dtype")}
        self.config["img_size"] = img_size if isinstance(img_size, int) else tuple(img_size)
        self.config["mean"] = tuple(float(m) for m in mean) if mean is not None else None
        self.config["std"] = tuple(float(s) for s in std) if std is not None else None
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.global_pool = global_pool
        self.num_features = self.head_hidden_size = self.embed_dim = embed_dim
        self.num_prefix_tokens = (1 if class_token else 0) + reg_tokens
        self.num_reg_tokens = reg_tokens
        self.has_class_token = class_token
        self.no_embed_class = no_embed_class
        self.pool_include_prefix = pool_include_prefix
        self.dynamic_img_size = dynamic_img_size
        self.grad_checkpointing = False
        self.backend = backend
        use_fc_norm = global_pool in ("avg", "max", "avgmax") if fc_norm is None else fc_norm

        # timm's factory arguments: every parameter and buffer is created on `device` (e.g. "meta":
        # no memory, no init, for FSDP's init on the meta device), then cast to `dtype`
        with torch.device(device) if device is not None else contextlib.nullcontext():
            # as timm's: with a dynamic image size the patch embedding gives NHWC maps (any grid)
            self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim, bias=not pre_norm,
                                          output_fmt="NHWC" if dynamic_img_size else None,
                                          strict_img_size=not dynamic_img_size)
            num_patches = self.patch_embed.num_patches
            self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim)) if class_token else None
            self.reg_token = nn.Parameter(torch.zeros(1, reg_tokens, embed_dim)) if reg_tokens else None
            embed_len = num_patches if no_embed_class else num_patches + self.num_prefix_tokens
            self.pos_embed = nn.Parameter(torch.zeros(1, embed_len, embed_dim))
            self.pos_drop = nn.Dropout(pos_drop_rate)
            # timm's: random patch tokens dropped in training (the prefix tokens kept)
            self.patch_drop = (PatchDropout(patch_drop_rate, self.num_prefix_tokens) if patch_drop_rate > 0
                               else nn.Identity())
            self.norm_pre = nn.LayerNorm(embed_dim, eps=norm_eps) if pre_norm else nn.Identity()
            dpr = torch.linspace(0, drop_path_rate, depth, device="cpu").tolist()
            self.blocks = nn.Sequential(
                *[
                    Block(embed_dim, num_heads, mlp_ratio, qkv_bias, qk_norm, proj_bias, proj_drop_rate,
                          attn_drop_rate, init_values, dpr[i], act_layer, norm_eps, backend)
                    for i in range(depth)
                ]
            )
            self.norm = nn.LayerNorm(embed_dim, eps=norm_eps) if final_norm and not use_fc_norm else nn.Identity()
            # "map": attention pooling with a learned query (SigLIP's head), timm's AttentionPoolLatent
            self.attn_pool = (AttentionPoolLatent(embed_dim, num_heads, mlp_ratio, act_layer, norm_eps)
                              if global_pool == "map" else None)
            self.fc_norm = nn.LayerNorm(embed_dim, eps=norm_eps) if final_norm and use_fc_norm else nn.Identity()
            self.head_drop = nn.Dropout(drop_rate)
            self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
            # default: the pretrained configs' (Inception) statistics, 0.5 for every channel
            mean = self.config["mean"] or (INCEPTION_MEAN[0],) * in_chans
            std = self.config["std"] or (INCEPTION_STD[0],) * in_chans
            self.register_buffer("pixel_mean", torch.tensor(mean, dtype=torch.float32), persistent=False)
            self.register_buffer("pixel_std", torch.tensor(std, dtype=torch.float32), persistent=False)
            self._pixel_stats = (tuple(mean), tuple(std))
            # timm's keys (a registered name gets timm's own dict from create_model / from_timm)
            self.pretrained_cfg = dict(
                input_size=(in_chans, *self.patch_embed.img_size), fixed_input_size=not dynamic_img_size,
                interpolation="bicubic", crop_pct=0.9, crop_mode="center", mean=tuple(mean), std=tuple(std),
                num_classes=num_classes, pool_size=None, first_conv="patch_embed.proj", classifier="head",
            )
            # one entry per block, as timm's VisionTransformer: what features_only / forward_intermediates give
            self.feature_info = [dict(module=f"blocks.{i}", num_chs=embed_dim,
                                      reduction=self.patch_embed.patch_size[0]) for i in range(depth)]
            # timm's: "skip" leaves the modules' own initialisation (init_weights() later: "reset")
            self.weight_init_mode = "reset" if weight_init == "skip" else weight_init
            self.fix_init = fix_init
            if weight_init != "skip":
                init_vit_weights(self, weight_init, fix_init=fix_init, needs_reset=False)
        if dtype is not None:
            self.to(dtype)  # the uint8 path's mean/std stay float32 (_apply)
        # load_state_dict(..., assign=True) onto a meta-device model: the statistics follow pos_embed
        self.register_load_state_dict_post_hook(_pixel_stats_follow)

    @property
    def _traits(self) -> dict:
        """timm's model traits (what timm's resolve_input_data_config reads), from the model as it is
        now: set_input_size moves them."""
        return dict(img_size=tuple(self.patch_embed.img_size), fixed_input_size=not self.dynamic_img_size,
                    first_conv="patch_embed.proj")

    @property
    def default_cfg(self) -> dict:
        """timm's older name for ``pretrained_cfg`` (the same dict)."""
        return self.pretrained_cfg

    @default_cfg.setter
    def default_cfg(self, cfg: dict) -> None:
        self.pretrained_cfg = cfg

    # -- construction helpers ---------------------------------------------------------------
    def _apply(self, fn, *args, **kwargs):
        # The uint8 path's statistics are constants, never moved or cast: rebuilt in float32 beside
        # pos_embed, so that model.to(bf16) does not round them, to_empty() (meta-device init) does
        # not blank them and a model whose weights were loaded with assign=True moves off "meta".
        del self._buffers["pixel_mean"], self._buffers["pixel_std"]
        try:
            super()._apply(fn, *args, **kwargs)
        finally:
            self._place_pixel_stats(force=True)
        return self

    def _place_pixel_stats(self, force: bool = False) -> None:
        dev = self.pos_embed.device
        if force or self._buffers.get("pixel_mean") is None or self.pixel_mean.device != dev:
            for name, stats in zip(("pixel_mean", "pixel_std"), self._pixel_stats):
                self.register_buffer(name, torch.tensor(stats, dtype=torch.float32, device=dev), persistent=False)

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        # a FastViT pickled whole by a vitfast before these existed
        if "patch_drop" not in self._modules:
            self.patch_drop = nn.Identity()
        for name, value in dict(attn_pool=None, weight_init_mode="", fix_init=False).items():
            if name not in self.__dict__ and name not in self._modules:
                setattr(self, name, value)
        self.config.setdefault("patch_drop_rate", 0.0)
        self.config.setdefault("weight_init", "")
        self.config.setdefault("fix_init", False)

    def _init_weights(self, m: nn.Module) -> None:
        """timm's compatibility method: one module initialised as timm's default mode does
        (``model.apply(model._init_weights)``)."""
        init_module_default(m)

    def init_weights(self, mode: str = "", needs_reset: bool = True) -> None:
        """timm's: initialise every weight with ``mode`` ("", "jax", "jax_nlhb", "moco", "reset";
        empty: the constructor's ``weight_init``), as timm's ``init_weights`` draws them
        (:func:`vitfast.models.init.init_vit_weights`), then :meth:`fix_init_weight` if the model
        was built with ``fix_init=True``."""
        init_vit_weights(self, mode or self.weight_init_mode, fix_init=self.fix_init, needs_reset=needs_reset)

    def fix_init_weight(self) -> None:
        """timm's: each block's attn.proj and mlp.fc2 weights divided by sqrt(2 * (layer + 1))."""
        fix_init_weight(self)

    def __prepare_scriptable__(self) -> nn.Module:
        """``torch.jit.script(model)`` scripts the plain-PyTorch model this FastViT computes on its
        reference path: a timm ``VisionTransformer`` with the same weights (``vitfast.to_timm``).
        The kernels themselves cannot be scripted: with ``backend="kernel"`` it raises, naming
        ``torch.export``, which keeps them."""
        how = ("export it with torch.export.export(model, (images,)) (the registered vitfast ops stay in the "
               "exported program), or script the reference path: model.set_backend('reference')")
        if self.backend == "kernel":
            raise RuntimeError(f"torch.jit.script(FastViT): backend='kernel' forces vitfast's kernels, which "
                               f"TorchScript cannot compile; {how}")
        try:
            from .convert import to_timm

            return to_timm(self)
        except ImportError as e:
            raise RuntimeError(f"torch.jit.script(FastViT) scripts the equivalent timm VisionTransformer and needs "
                               f"timm installed; or {how}") from e

    @torch.jit.ignore
    def no_weight_decay(self) -> set:
        return {"pos_embed", "cls_token", "reg_token"}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        return dict(stem=r"^cls_token|reg_token|pos_embed|patch_embed|norm_pre",
                    blocks=[(r"^blocks\.(\d+)", None), (r"^norm", (99999,))])

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    def set_backend(self, backend: str) -> "FastViT":
        """Switch every module between "auto", "kernel" and "reference" (the older "kernels" works)."""
        self.backend = self.config["backend"] = check_backend(backend)
        for blk in self.blocks:
            blk.attn.backend = self.backend
        return self

    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        if global_pool is not None:
            if global_pool not in POOLS:
                raise ValueError(f"global_pool must be one of {list(POOLS)}, got {global_pool!r}")
            if global_pool == "token" and not self.has_class_token:
                raise ValueError("global_pool='token' needs a class token; this model has none")
            if global_pool == "map" and self.attn_pool is None:  # timm's rule: it is built, never added
                raise ValueError("reset_classifier cannot add attention pooling (global_pool='map'): build the "
                                 "model with global_pool='map'")
            if global_pool != "map":
                self.attn_pool = None  # removed, as timm's
            self.global_pool = self.config["global_pool"] = global_pool
            self.config["fc_norm"] = not isinstance(self.fc_norm, nn.Identity)  # keep the norm placement
        self.num_classes = self.config["num_classes"] = num_classes
        ref = self.pos_embed
        self.head = nn.Linear(self.embed_dim, num_classes, device=ref.device, dtype=ref.dtype) if num_classes > 0 \
            else nn.Identity()
        self.head.train(self.training)

    def set_input_size(self, img_size: Optional[Union[int, Tuple[int, int]]] = None,
                       patch_size: Optional[Union[int, Tuple[int, int]]] = None) -> None:
        """timm's: change the input resolution and/or the patch size, e.g. to fine-tune at 384.
        The positional embedding is resampled to the new grid (bicubic, as timm's), a new patch
        size resamples the projection (FlexiViT's pseudo-inverse, as timm's); ``config`` follows,
        so ``FastViT(**model.config)`` builds the resized architecture. ``pretrained_cfg`` keeps
        describing the checkpoint, as timm's does. The new parameters are new ``nn.Parameter``
        objects: build the optimizer after this call."""
        pe = self.patch_embed
        prev_grid = pe.grid_size
        pe.set_input_size(img_size=img_size, patch_size=patch_size)  # checks before it changes anything
        if pe.grid_size != prev_grid:
            old = self.pos_embed
            with torch.no_grad():
                new = resample_abs_pos_embed(old.detach(), pe.grid_size, prev_grid,
                                             0 if self.no_embed_class else self.num_prefix_tokens)
            self.pos_embed = nn.Parameter(new, requires_grad=old.requires_grad)
        self.config["img_size"] = pe.img_size[0] if pe.img_size[0] == pe.img_size[1] else tuple(pe.img_size)
        self.config["patch_size"] = pe.patch_size[0]
        for f in self.feature_info:
            f["reduction"] = pe.patch_size[0]

    # -- forward ------------------------------------------------------------------------------
    def _pos_embed(self, x: torch.Tensor) -> torch.Tensor:
        """timm's: the patch embedding's output (``[B, N, D]``, or ``[B, H, W, D]`` with a dynamic
        image size) -> tokens with the class/register tokens and the positional embedding, after
        the positional dropout."""
        return self.pos_drop(add_tokens(x, cls_token=self.cls_token, reg_token=self.reg_token,
                                        pos_embed=self.pos_embed, no_embed_class=self.no_embed_class,
                                        grid_size=self.patch_embed.grid_size))

    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        """Images -> tokens: timm's ``patch_embed``, ``_pos_embed``, ``patch_drop`` and ``norm_pre``,
        through the fused patch-embedding op where nothing needs the modules called."""
        pe = self.patch_embed
        check_images(x, self.in_chans, pe.patch_size[0], pe.img_size, self.dynamic_img_size, "FastViT")
        if fx_symbolic_tracing() or not all(calls_only_forward(m) for m in pe.modules()):
            # hooks on patch_embed or its proj (a feature getter's, a user's), a compile or FSDP2
            # sharding of them, an FX trace (node names patch_embed.*): the module is called
            x = self._pos_embed(pe(images_for_proj(x, self.pixel_mean, self.pixel_std, pe.proj.weight.dtype)))
        else:
            x = self.pos_drop(embed_images(x, pe.proj, mean=self.pixel_mean, std=self.pixel_std, backend=self.backend,
                                           cls_token=self.cls_token, reg_token=self.reg_token,
                                           pos_embed=self.pos_embed, no_embed_class=self.no_embed_class,
                                           grid_size=pe.grid_size))
        return self.norm_pre(self.patch_drop(x))

    def _run_block(self, blk: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if self.grad_checkpointing and torch.is_grad_enabled():
            return checkpoint(blk, x, use_reentrant=False)
        return blk(x)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self._embed(x)
        if (self.grad_checkpointing and torch.is_grad_enabled()) or fx_symbolic_tracing():
            for blk in self.blocks:  # one checkpoint / one graph leaf per block
                x = self._run_block(blk, x)
            return self.norm(x)
        if not calls_only_forward(self.blocks):  # hooked or sharded as a whole: called, as timm does
            return self.norm(self.blocks(x))
        # fused blocks hand the residual stream to the next block's norm1 (and the last one to
        # the final norm) in one add_layer_norm each (vitfast.modules.block.blocks_forward)
        return blocks_forward(self.blocks, x, self.norm)[1]

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: Optional[Union[int, Sequence[int]]] = None,
        return_prefix_tokens: bool = False,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
        output_dict: bool = False,
        attn_mask: Optional[torch.Tensor] = None,
        is_causal: bool = False,
    ):
        """timm's forward_intermediates: ``(final features, [block outputs])`` for the blocks in
        ``indices`` (None: all; n: the last n), as ``NCHW`` maps or ``NLC`` tokens, prefix tokens
        split off (returned as ``(spatial, prefix)`` pairs with ``return_prefix_tokens``).
        ``output_dict``: timm's dict instead, ``image_intermediates`` (and
        ``image_intermediates_prefix`` with ``return_prefix_tokens``, ``image_features`` unless
        ``intermediates_only``). ``attn_mask`` / ``is_causal`` go to every block's attention."""
        if output_fmt not in ("NCHW", "NLC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NLC', got {output_fmt!r}")
        take, max_index = _take_indices(len(self.blocks), indices)
        B = x.shape[0]
        H, W = grid_of(x, self.patch_embed.patch_size[0])
        x = self._embed(x)
        blocks = self.blocks[: max_index + 1] if stop_early else self.blocks
        inter = []
        for i, blk in enumerate(blocks):
            if attn_mask is not None or is_causal:
                x = blk(x, attn_mask=attn_mask, is_causal=is_causal)
            else:
                x = self._run_block(blk, x)
            if i in take:
                inter.append(self.norm(x) if norm else x)
        n = self.num_prefix_tokens
        prefix = [y[:, :n] for y in inter] if n else None
        inter = [y[:, n:] for y in inter]
        if output_fmt == "NCHW":
            if inter and inter[0].shape[1] != H * W:  # timm reshapes the kept tokens to the grid regardless
                raise ValueError(f"output_fmt='NCHW' needs all {H * W} patch tokens, the blocks saw "
                                 f"{inter[0].shape[1]} (patch dropout in training): use output_fmt='NLC'")
            inter = [y.reshape(B, H, W, -1).permute(0, 3, 1, 2).contiguous() for y in inter]
        if output_dict:
            out = dict(image_intermediates=inter)
            if return_prefix_tokens and prefix is not None:
                out["image_intermediates_prefix"] = prefix
            if not intermediates_only:
                out["image_features"] = self.norm(x)
            return out
        if return_prefix_tokens and prefix is not None:
            inter = list(zip(inter, prefix))
        if intermediates_only:
            return inter
        return self.norm(x), inter

    def get_intermediate_layers(
        self,
        x: torch.Tensor,
        n: Union[int, Sequence[int]] = 1,
        reshape: bool = False,
        return_prefix_tokens: bool = False,
        norm: bool = False,
        attn_mask: Optional[torch.Tensor] = None,
    ) -> list:
        """timm's (and DINO's) interface: the outputs of the last ``n`` blocks (or of blocks ``n``),
        ``NCHW`` maps with ``reshape`` else ``NLC`` tokens; :meth:`forward_intermediates`."""
        return self.forward_intermediates(x, n, return_prefix_tokens=return_prefix_tokens, norm=norm,
                                          output_fmt="NCHW" if reshape else "NLC", intermediates_only=True,
                                          attn_mask=attn_mask)

    def prune_intermediate_layers(self, indices: Union[int, Sequence[int]] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> List[int]:
        """timm's: drop the blocks after the last one in ``indices`` (and the final norm, the head
        with ``prune_norm`` / ``prune_head``); returns the kept indices."""
        take, max_index = _take_indices(len(self.blocks), indices)
        self.blocks = self.blocks[: max_index + 1]
        self.feature_info = self.feature_info[: max_index + 1]
        if prune_norm:
            self.norm = nn.Identity()
        if prune_head:
            self.fc_norm = nn.Identity()
            self.reset_classifier(0, "")
        return take

    def pool(self, x: torch.Tensor, pool_type: Optional[str] = None) -> torch.Tensor:
        if self.attn_pool is not None:  # as timm: the attention pool whatever pool_type says
            return self.attn_pool(x if self.pool_include_prefix else x[:, self.num_prefix_tokens:])
        pool_type = self.global_pool if pool_type is None else pool_type
        if pool_type == "map":
            raise ValueError("pool_type='map' needs the attention pool, which this model has not (built "
                             "without global_pool='map', or removed by reset_classifier)")
        if pool_type not in POOLS:
            raise ValueError(f"pool_type must be one of {list(POOLS)}, got {pool_type!r}")
        if pool_type == "token":
            return x[:, 0]
        if pool_type == "":
            return x
        if not self.pool_include_prefix:
            x = x[:, self.num_prefix_tokens :]
        if pool_type == "avg":
            return x.mean(dim=1)
        if pool_type == "max":
            return x.amax(dim=1)
        return 0.5 * (x.amax(dim=1) + x.mean(dim=1))  # avgmax

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.pool(x)
        x = self.fc_norm(x)
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))
