"""Under autocast FastViT carries timm's float32 residual stream, whichever path embeds the
patches: the patch-embedding op adds the float32 class token and positions in float32 (as
timm's cat and add promote), so the blocks see float32 tokens. With the 16-bit tokens the op
used to return under autocast, a depth-8 ViT's loss error was 2.6x timm's own autocast error and
its worst gradient error 2.9-4.2x (CPU, bf16)."""

import pytest
import torch
import torch.nn.functional as F

timm = pytest.importorskip("timm")

from vitfast.models.convert import from_timm  # noqa: E402

X = torch.randn(4, 3, 48, 48, generator=torch.Generator().manual_seed(5))
Y = torch.tensor([0, 1, 2, 3])


def _run(m, autocast: bool):
    m.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = m(X)
    F.cross_entropy(out.float(), Y).backward()
    return out.detach().double(), {n: p.grad.detach().clone() for n, p in m.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("backend", ["reference", "auto"])
@pytest.mark.parametrize("kw", [{}, dict(reg_tokens=4, no_embed_class=True)], ids=["cls", "reg4"])
def test_autocast_residual_stream_and_error_within_2x_timm(backend, kw):
    """Logits and every gradient within 2x timm's own bf16-autocast error (against timm in
    float32). Carrying a bf16 residual instead (the old tokens) gave gradient errors 2.9-3.7x."""
    torch.manual_seed(0)
    t = timm.create_model("vit_small_patch16_224", depth=8, img_size=48, num_classes=5, **kw)
    f = from_timm(t)
    f.set_backend(backend)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert f._embed(X).dtype == torch.float32  # the residual stream, as timm's
    o32, g32 = _run(t, False)
    ot, gt = _run(t, True)
    of, gf = _run(f, True)
    # the logits come out in bf16: a floor of one bf16 ulp at their magnitude (max errors of
    # rounded values are quantised: 1 ulp for timm against 2 for FastViT fails a bare 2x on AVX2)
    assert (of - o32).abs().max() <= 2 * (ot - o32).abs().max() + 2**-8 * o32.abs().max()
    for n in g32:
        assert (gf[n] - g32[n]).abs().max() <= 2 * (gt[n] - g32[n]).abs().max() + 1e-6 * g32[n].abs().max(), n
