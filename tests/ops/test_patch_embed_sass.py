"""The CUDA patch embedding's memory instructions on sm_90, read from the built extension's SASS.

No GPU needed: the build compiles csrc/cuda/patch_embed.cu for sm_90 (TORCH_CUDA_ARCH_LIST
defaults to "8.0;9.0") wherever nvcc is, and cuobjdump reads it back. These are the static
checks of issue 16, item 1: the common NCHW path and channels_last 3- and 4-channel images stage
nothing in shared memory (the 16-bit shared stores of the old tile kernel conflicted 14 ways), move
pixels and tokens with 16-byte accesses, keeps the channel's scale/shift in registers, and spills nothing. The speed itself is
measured on a GPU (benchmarks/gpu_check.sh, ncu's bank-conflict counters).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
import _patch_embed_sass as sass  # noqa: E402


@pytest.fixture(scope="module")
def counts():
    so = sass.built_extension()
    if so is None:
        pytest.skip("vitfast._C is not built")
    if sass.find_cuobjdump() is None:
        pytest.skip("no cuobjdump (CUDA toolkit or triton's NVIDIA backend)")
    found = sass.sass_counts(so)
    if not found:
        pytest.skip("vitfast._C has no sm_90 code (built without nvcc, or without 9.0 in TORCH_CUDA_ARCH_LIST)")
    return found


# (image dtype, patch-matrix dtype): the forms users call (raw uint8 or normalised float images,
# bf16/fp16/fp32 weights)
FORWARD = [("uint8", "bf16"), ("uint8", "fp16"), ("uint8", "fp32"), ("bf16", "bf16"), ("fp16", "fp16"),
           ("fp32", "fp32"), ("fp32", "bf16")]
# (gradient-matrix dtype, image dtype)
BACKWARD = [("bf16", "bf16"), ("fp16", "fp16"), ("fp32", "fp32"), ("bf16", "fp32")]
NARROW_SHARED = ("STS.U16", "LDS.U16", "STS.U8", "LDS.U8", "STS.S16", "LDS.S16")
NARROW_GLOBAL_STORES = ("STG.E.U16", "STG.E.U8", "STG.E", "STG.E.S16")
SPILLS = ("STL", "LDL", "STL.64", "LDL.64", "STL.128", "LDL.128")


def _get(counts, name):
    assert name in counts, f"{name} not in the SASS; kernels found: {sorted(counts)[:8]}..."
    return counts[name]


def _total(c, ops):
    return sum(c.get(op, 0) for op in ops)


@pytest.mark.parametrize("img,mat", FORWARD, ids=[f"{a}->{b}" for a, b in FORWARD])
def test_patchify_rows_kernel_stages_nothing_and_moves_16_bytes(counts, img, mat):
    c = _get(counts, f"patchify_rows_kernel<{img},{mat}>")
    assert _total(c, NARROW_SHARED) == 0, dict(c)
    assert c.get("LDG.E.128.CONSTANT", 0) >= 1, dict(c)  # the pixels: one 16-byte load per thread and item
    # the outputs: 16-byte stores (8 bytes when a 16-byte pixel load yields only 8 bytes, fp32 -> bf16)
    assert c.get("STG.E.128", 0) >= 1 and _total(c, NARROW_GLOBAL_STORES) == 0, dict(c)
    assert _total(c, SPILLS) == 0, dict(c)
    # scale and shift: two shared loads per item, held in registers for its 4-16 outputs
    assert c.get("LDS", 0) + c.get("LDS.64", 0) <= 2, dict(c)


@pytest.mark.parametrize("mat,img", BACKWARD, ids=[f"{a}->{b}" for a, b in BACKWARD])
def test_unpatchify_rows_kernel_stages_nothing_and_moves_16_bytes(counts, mat, img):
    c = _get(counts, f"unpatchify_rows_kernel<{mat},{img}>")
    assert _total(c, NARROW_SHARED) == 0, dict(c)
    assert c.get("STG.E.128", 0) >= 1 and _total(c, NARROW_GLOBAL_STORES) == 0, dict(c)
    assert c.get("LDG.E.128.CONSTANT", 0) + c.get("LDG.E.64.CONSTANT", 0) >= 2, dict(c)  # + the std read
    assert "LDG.E.U16.CONSTANT" not in c, dict(c)
    assert _total(c, SPILLS) == 0, dict(c)


NARROW_GLOBAL_LOADS = ("LDG.E.U8.CONSTANT", "LDG.E.U16.CONSTANT", "LDG.E.U8", "LDG.E.U16")


@pytest.mark.parametrize("C", [3, 4])
@pytest.mark.parametrize("img,mat", FORWARD, ids=[f"{a}->{b}" for a, b in FORWARD])
def test_patchify_hwc_kernel_deinterleaves_in_registers(counts, img, mat, C):
    """channels_last images: the channels are de-interleaved in registers (the tile kernel staged
    them in shared memory with conflicting 16-bit stores); pixels come in with 8- or 16-byte
    loads, each channel's run goes out with one 16-byte store (plus one for the class rows)."""
    c = _get(counts, f"patchify_hwc_kernel<{img},{mat},C{C}>")
    assert _total(c, NARROW_SHARED) == 0 and c.get("STS.U16", 0) == 0, dict(c)
    assert _total(c, NARROW_GLOBAL_LOADS) == 0, dict(c)
    assert c.get("LDG.E.128.CONSTANT", 0) + c.get("LDG.E.64.CONSTANT", 0) >= 1, dict(c)
    assert c.get("STG.E.128", 0) >= C + 1 and _total(c, NARROW_GLOBAL_STORES) == 0, dict(c)
    assert _total(c, SPILLS) == 0, dict(c)


@pytest.mark.parametrize("C", [3, 4])
@pytest.mark.parametrize("mat,img", BACKWARD, ids=[f"{a}->{b}" for a, b in BACKWARD])
def test_unpatchify_hwc_kernel_interleaves_in_registers(counts, mat, img, C):
    c = _get(counts, f"unpatchify_hwc_kernel<{mat},{img},C{C}>")
    assert _total(c, NARROW_SHARED) == 0, dict(c)
    assert c.get("LDG.E.128.CONSTANT", 0) >= C and _total(c, NARROW_GLOBAL_LOADS) == 0, dict(c)
    assert c.get("STG.E.128", 0) + c.get("STG.E.64", 0) >= 1 and _total(c, NARROW_GLOBAL_STORES) == 0, dict(c)
    assert _total(c, SPILLS) == 0, dict(c)


@pytest.mark.parametrize("dtype", ["bf16", "fp16", "fp32"])
@pytest.mark.parametrize("index", ["int32", "int64"])
def test_prefill_reads_bias_and_pos_with_16_byte_loads(counts, dtype, index):
    c = _get(counts, f"prefill_kernel<{dtype},{index},vec>")
    assert c.get("LDG.E.128.CONSTANT", 0) >= 2, dict(c)  # bias (or cls) and pos
    assert c.get("STG.E.128", 0) >= 1 and _total(c, NARROW_GLOBAL_STORES) == 0, dict(c)
    assert not any(op.startswith("LDG") and op != "LDG.E.128.CONSTANT" for op in c), dict(c)


def test_the_table_prints(counts, capsys):
    text = sass.table(counts)
    assert "patchify_rows_kernel<uint8,bf16>" in text and "STS.U16" in text.splitlines()[0]
