"""Inference with the whole forward captured in one CUDA graph.

``optimize_for_inference(model, batch_size, dtype)`` puts the model in eval mode, casts it
to ``dtype`` on the GPU, runs it a few times (Triton compiles and autotunes there), then
captures one forward for a fixed input shape ``[batch_size, C, H, W]`` in a CUDA graph.
The returned :class:`CUDAGraphModule` copies each new input into the graph's static input
buffer and replays the graph: one launch for the whole network, so the per-kernel launch
overhead (hundreds of small kernels in a ViT) disappears.

Contract (what a user must know):

* **In place.** ``model`` itself is moved/cast and put in eval mode, and it stays owned by
  the returned module (``module.model``); keep a copy (``copy.deepcopy``) if you need the
  original. ``module.load_state_dict(...)`` copies into the captured parameters and is
  picked up by the next replay; moving or casting the module afterwards (``.to()``,
  ``.half()``) would invalidate the graph and raises instead.
* **Shapes.** Inputs must have the captured shape, except that a smaller batch is allowed:
  it is copied into the first rows of the static buffer and the output is sliced. This
  relies on samples being independent, which holds for ViTs in eval mode (LayerNorm,
  attention and pooling are per sample).
* **Dtypes.** Float inputs of any float dtype are cast into the static buffer's dtype (the
  model's ``dtype`` unless ``input_dtype`` says otherwise, e.g. ``torch.uint8`` for
  FastViT's fused normalisation of raw images).
* **Outputs.** Cloned by default, so a later call cannot overwrite a result you still
  hold; ``clone_output=False`` returns views of the graph's static output (valid until the
  next call; faster). No autograd: inference only.
* **Devices.** The graph is captured and replayed on the model's device (``cuda:1`` works
  whichever device is current); a CPU model goes to the current CUDA device.
* **No CUDA.** Without a GPU there is nothing to capture: the model is returned in eval mode
  and otherwise unchanged, with a ``RuntimeWarning`` (``strict=True`` raises instead).
"""

from __future__ import annotations

import warnings
from typing import Any, Optional, Sequence

import torch
import torch.nn as nn
from torch.utils._pytree import tree_map

__all__ = ["optimize_for_inference", "CUDAGraphModule", "infer_input_shape"]


def infer_input_shape(model: nn.Module) -> tuple[int, int, int]:
    """``(C, H, W)`` of one image, from a FastViT or timm ViT (``patch_embed.img_size`` and
    the patch projection's ``in_channels``, or timm's ``pretrained_cfg['input_size']``)."""
    pe = getattr(model, "patch_embed", None)
    img, chans = getattr(pe, "img_size", None), getattr(getattr(pe, "proj", None), "in_channels", None)
    if img is not None and chans is not None:
        h, w = (img, img) if isinstance(img, int) else tuple(img)
        return int(chans), int(h), int(w)
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
    if "input_size" in cfg:
        c, h, w = cfg["input_size"]
        return int(c), int(h), int(w)
    raise ValueError(f"vitfast.optimize_for_inference: cannot tell the input shape of {type(model).__name__}; "
                     "pass input_shape=(C, H, W)")


class CUDAGraphModule(nn.Module):
    """A model's forward captured in a CUDA graph for a fixed input buffer (see the module
    docstring for the contract). Build it with :func:`optimize_for_inference`."""

    def __init__(self, model: nn.Module, static_input: torch.Tensor, *, warmup: int = 3, clone_output: bool = True):
        super().__init__()
        self.model = model
        self.static_input = static_input
        self.clone_output = clone_output
        self.batch_size = static_input.shape[0]
        self._captured = False
        self.static_output = self._capture(warmup)
        self._captured = True

    # The two device-specific steps, overridable (tests run the wrapper logic on the CPU).
    def _capture(self, warmup: int) -> Any:
        # Everything on the model's device: torch.cuda.graph() without a stream captures on a
        # process-wide side stream made on whichever device was current at its first use, and
        # entering it makes that device current; the ops of a model on another device (cuda:1
        # while cuda:0 is current) would then go to their own device's stream, uncaptured: an empty
        # graph whose replays return the warm-up's output for any input. So the warm-up and the
        # capture run under torch.cuda.device(device) on one side stream made there, the warm-up
        # as torch's docs have it (the side stream waits for the current one, and back).
        device = self.static_input.device
        with torch.cuda.device(device):
            stream = torch.cuda.Stream(device)
            stream.wait_stream(torch.cuda.current_stream(device))
            with torch.no_grad(), torch.cuda.stream(stream):
                for _ in range(max(1, warmup)):  # compiles/autotunes every kernel outside the capture
                    self.model(self.static_input)
            torch.cuda.current_stream(device).wait_stream(stream)
            torch.cuda.synchronize(device)
            self.graph = torch.cuda.CUDAGraph()
            with torch.no_grad(), torch.cuda.graph(self.graph, stream=stream):
                out = self.model(self.static_input)
        return out

    def _replay(self) -> None:
        # with the model's device current, whatever the caller's: the launch goes to that device's
        # current stream, the one the input copy before it and the output reads after it use
        with torch.cuda.device(self.static_input.device):
            self.graph.replay()

    def _check_input(self, x: torch.Tensor) -> None:
        static = self.static_input
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"vitfast.CUDAGraphModule: x must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != static.dim() or tuple(x.shape[1:]) != tuple(static.shape[1:]):
            raise ValueError(f"vitfast.CUDAGraphModule: x has shape {list(x.shape)}; the graph was captured for "
                             f"[<= {self.batch_size}, {', '.join(map(str, static.shape[1:]))}]")
        if not 1 <= x.shape[0] <= self.batch_size:
            raise ValueError(f"vitfast.CUDAGraphModule: x has batch {x.shape[0]}; the graph was captured for "
                             f"batch_size={self.batch_size} (smaller batches are padded; for a larger one call "
                             "it in chunks or capture again)")
        if static.is_floating_point() != x.is_floating_point():
            raise TypeError(f"vitfast.CUDAGraphModule: x has dtype {x.dtype}; the graph takes {static.dtype} inputs")

    def forward(self, x: torch.Tensor) -> Any:
        self._check_input(x)
        n = x.shape[0]
        with torch.no_grad():
            # A blocking copy: with non_blocking a pinned CPU x would be read by an async
            # H2D copy after this call returns (a caller refilling x would race it); from a
            # CUDA x the copy is stream-ordered either way.
            self.static_input[:n].copy_(x)
            self._replay()

            def out(t):
                if not isinstance(t, torch.Tensor):
                    return t
                t = t[:n] if n < self.batch_size and t.dim() and t.shape[0] == self.batch_size else t
                return t.clone() if self.clone_output else t

            return tree_map(out, self.static_output)

    def _apply(self, fn, recurse=True):
        if getattr(self, "_captured", False):
            raise RuntimeError("vitfast.CUDAGraphModule: the captured graph points at the current parameters; "
                               "moving or casting them would invalidate it. Call optimize_for_inference on the "
                               "model again instead.")
        return super()._apply(fn, recurse)

    def extra_repr(self) -> str:
        return (f"input={list(self.static_input.shape)} {self.static_input.dtype} on {self.static_input.device}, "
                f"clone_output={self.clone_output}")


def _model_device(model: nn.Module) -> Optional[torch.device]:
    for t in list(model.parameters()) + list(model.buffers()):
        return t.device
    return None


def optimize_for_inference(model: nn.Module, batch_size: int, dtype: torch.dtype = torch.bfloat16, *,
                           input_shape: Optional[Sequence[int]] = None, input_dtype: Optional[torch.dtype] = None,
                           warmup: int = 3, clone_output: bool = True, strict: bool = False) -> nn.Module:
    """Capture ``model``'s forward for ``[batch_size, *input_shape]`` inputs in a CUDA graph.

    ``dtype`` is the dtype the model's parameters are cast to (in place); ``input_shape``
    ``(C, H, W)`` defaults to the model's image size (:func:`infer_input_shape`);
    ``input_dtype`` (default ``dtype``) is the static input buffer's dtype. A model on the
    CPU is moved to the current CUDA device. Returns a :class:`CUDAGraphModule`; without
    CUDA, ``model.eval()`` with a RuntimeWarning (``strict=True``: RuntimeError).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"vitfast.optimize_for_inference: model must be a torch.nn.Module, got {type(model).__name__}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"vitfast.optimize_for_inference: batch_size must be a positive int, got {batch_size!r}")
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"vitfast.optimize_for_inference: dtype must be a floating-point torch.dtype, got {dtype!r}")
    if input_dtype is not None and (not isinstance(input_dtype, torch.dtype) or input_dtype.is_complex):
        raise TypeError(f"vitfast.optimize_for_inference: input_dtype must be a real torch.dtype, got {input_dtype!r}")
    if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 1:
        raise ValueError(f"vitfast.optimize_for_inference: warmup must be a positive int, got {warmup!r}")
    if input_shape is not None:
        input_shape = tuple(input_shape)
        if not input_shape or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 1 for d in input_shape):
            raise ValueError(f"vitfast.optimize_for_inference: input_shape must be a tuple of positive ints "
                             f"(C, H, W), got {input_shape!r}")
    device = _model_device(model)
    if device is not None and device.type not in ("cuda", "cpu"):
        raise ValueError(f"vitfast.optimize_for_inference: model is on {device}; expected a CPU or CUDA model")
    if not torch.cuda.is_available():
        msg = ("vitfast.optimize_for_inference: CUDA graphs need a CUDA GPU and none is available; "
               "returning the model in eval mode, without a graph")
        if strict:
            raise RuntimeError(msg)
        warnings.warn(msg, RuntimeWarning, stacklevel=2)
        return model.eval()
    if input_shape is None:
        input_shape = infer_input_shape(model)
    if device is None or device.type != "cuda":
        device = torch.device("cuda", torch.cuda.current_device())
    model.eval().to(device=device, dtype=dtype)
    static_input = torch.zeros((batch_size, *input_shape), dtype=input_dtype or dtype, device=device)
    return CUDAGraphModule(model, static_input, warmup=warmup, clone_output=clone_output)
