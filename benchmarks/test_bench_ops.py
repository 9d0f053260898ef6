"""The ops against their plain-PyTorch references: attention and patch embedding.

GPU: ViT-B/16's shapes at batch 256 in bf16 (attention B 256, H 12, N 197, D 64; patch
embedding 256x3x224x224 -> 256x197x768). CPU: small shapes in fp32 (the ops run their CPU
paths: SDPA for attention, the C++ kernel for patch embedding)."""

import pytest
import torch
import torch.nn.functional as F

from vitfast.ops.attention import attention
from vitfast.ops.patch_embed import patch_embed
from vitfast.ops.reference import attention_ref, patch_embed_ref

from conftest import CUDA, DEVICE

DTYPE = torch.bfloat16 if CUDA else torch.float32
B, H, N, D = (256, 12, 197, 64) if CUDA else (2, 3, 197, 64)
IMG_B, IMG, P, DIM = (256, 224, 16, 768) if CUDA else (4, 64, 16, 192)
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)

ATTENTION = {
    "vitfast": lambda q, k, v: attention(q, k, v),
    "sdpa": lambda q, k, v: F.scaled_dot_product_attention(q, k, v),
    "reference": lambda q, k, v: attention_ref(q, k, v, upcast=False),
}


def _qkv(requires_grad):
    g = torch.Generator(device=DEVICE).manual_seed(0)
    return [torch.randn(B, H, N, D, device=DEVICE, dtype=DTYPE, generator=g).requires_grad_(requires_grad)
            for _ in range(3)]


@pytest.mark.parametrize("impl", list(ATTENTION))
def test_attention_fwd(run, impl):
    q, k, v = _qkv(False)
    fn = ATTENTION[impl]

    def fwd():
        with torch.no_grad():
            fn(q, k, v)

    run(fwd, flops=4 * B * H * N * N * D)


@pytest.mark.parametrize("impl", list(ATTENTION))
def test_attention_fwd_bwd(run, impl):
    q, k, v = _qkv(True)
    dout = torch.randn_like(q)
    fn = ATTENTION[impl]

    def fwd_bwd():
        for t in (q, k, v):
            t.grad = None
        fn(q, k, v).backward(dout)

    run(fwd_bwd, flops=4 * B * H * N * N * D * 3)  # model FLOPs: backward = 2x forward


def _patch_inputs(uint8):
    g = torch.Generator(device=DEVICE).manual_seed(0)
    shape = (IMG_B, 3, IMG, IMG)
    images = (torch.randint(0, 256, shape, device=DEVICE, dtype=torch.uint8, generator=g) if uint8
              else torch.randn(shape, device=DEVICE, dtype=DTYPE, generator=g))
    n = (IMG // P) ** 2
    w = torch.randn(DIM, 3, P, P, device=DEVICE, dtype=DTYPE, generator=g) * 0.02
    b, cls = torch.zeros(DIM, device=DEVICE, dtype=DTYPE), torch.zeros(1, 1, DIM, device=DEVICE, dtype=DTYPE)
    pos = torch.randn(1, n + 1, DIM, device=DEVICE, dtype=DTYPE, generator=g) * 0.02
    return images, w, b, cls, pos


@pytest.mark.parametrize("uint8", [False, True], ids=["float", "uint8"])
@pytest.mark.parametrize("impl", ["vitfast", "reference"])
def test_patch_embed(run, impl, uint8):
    images, w, b, cls, pos = _patch_inputs(uint8)
    stats = dict(mean=MEAN, std=STD) if uint8 else {}
    fn = patch_embed if impl == "vitfast" else patch_embed_ref
    n = (IMG // P) ** 2
    flops = 2 * IMG_B * n * 3 * P * P * DIM
    nbytes = images.numel() * images.element_size() + IMG_B * (n + 1) * DIM * w.element_size()

    def fwd():
        with torch.no_grad():
            fn(images, w, b, cls_token=cls, pos_embed=pos, **stats)

    run(fwd, flops=flops, nbytes=nbytes)
