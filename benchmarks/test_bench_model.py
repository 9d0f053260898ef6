"""End-to-end model steps: FastViT, the reference and timm, inference and training.

GPU: ViT-B/16 at 224, batch 256, bf16 (the sizes of the README). CPU: a 2-block ViT-B at
32 px, batch 2, fp32 (checks that every case runs; CPU figures)."""

import pytest
import torch

from vitfast.cli import bench
from vitfast.cli.benchmarking import vit_step_flops

from conftest import CUDA, DEVICE

MODEL = "vit_base_patch16_224"
SIZES = dict(batch_size=256, img_size=None, depth=None, dtype=torch.bfloat16, dtype_name="bf16") if CUDA else \
    dict(batch_size=2, img_size=32, depth=2, dtype=torch.float32, dtype_name="fp32")


def _config(**kw) -> bench.Config:
    return bench.Config(models=[MODEL], modes=["infer"], impls=list(bench.IMPLS), compile=False, warmup=0, iters=1,
                        device=DEVICE, check=False, peak_tflops=None, **{**SIZES, **kw})


@pytest.mark.parametrize("uint8", [False, True], ids=["float", "uint8"])
@pytest.mark.parametrize("mode", ["infer", "train"])
@pytest.mark.parametrize("impl", bench.IMPLS)
def test_model_step(run, impl, mode, uint8):
    cfg = _config(uint8=uint8)
    torch.manual_seed(0)
    model = bench.build_model(MODEL, impl, bench.model_overrides(cfg), DEVICE, uint8)
    if mode == "infer":
        model.to(cfg.dtype)
    vit = model[-1] if isinstance(model, torch.nn.Sequential) else model
    xs, ys = bench.make_inputs(cfg, model, mode, vit.num_classes)
    step, _ = bench.make_step(model, cfg, mode, xs, ys)
    i = iter(range(10**9))
    run(lambda: step(next(i)), flops=vit_step_flops(vit, mode) * cfg.batch_size)
