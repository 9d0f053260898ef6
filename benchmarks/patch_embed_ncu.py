"""One call of each CUDA patch-embedding path, for ncu (benchmarks/gpu_check.sh, step 6).

ViT-B/16 at batch 64, bf16 weights, the C++ three-kernel path (backend="gemm"; "kernel" would take
the fused Triton kernel): uint8 NCHW and channels_last images (patchify_rows_kernel,
patchify_hwc_kernel), and bf16 images NCHW and channels_last forward + backward (unpatchify_rows_kernel,
unpatchify_hwc_kernel). Run under
    ncu --clock-control none -k regex:"patchify|prefill" --metrics \
        l1tex__data_bank_conflicts_pipe_lsu_mem_shared_op_st.sum,... python benchmarks/patch_embed_ncu.py
so each kernel's shared-memory bank conflicts and DRAM bytes are counted.
"""

import torch

import vitfast  # noqa: F401  (registers torch.ops.vitfast)
from vitfast.ops.patch_embed import patch_embed

B, D, p = 64, 768, 16
dev = torch.device("cuda")
g = torch.Generator(device=dev).manual_seed(0)
w = (torch.randn(D, 3, p, p, device=dev, generator=g) * 0.02).to(torch.bfloat16).requires_grad_()
bias = torch.randn(D, device=dev, generator=g).to(torch.bfloat16)
cls = torch.randn(1, 1, D, device=dev, generator=g).to(torch.bfloat16)
pos = torch.randn(1, 197, D, device=dev, generator=g).to(torch.bfloat16)
mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
raw = torch.randint(0, 256, (B, 3, 224, 224), device=dev, dtype=torch.uint8, generator=g)
for images in (raw, raw.contiguous(memory_format=torch.channels_last)):
    patch_embed(images, w, bias, cls_token=cls, pos_embed=pos, mean=mean, std=std, backend="gemm")
x = torch.randn(B, 3, 224, 224, device=dev, generator=g).to(torch.bfloat16)
for images in (x, x.contiguous(memory_format=torch.channels_last)):
    images.requires_grad_()
    patch_embed(images, w, bias, cls_token=cls, pos_embed=pos, backend="gemm").float().square().mean().backward()
torch.cuda.synchronize()
print("patch_embed ncu driver: done")
