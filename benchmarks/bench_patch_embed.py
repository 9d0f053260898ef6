"""``python benchmarks/bench_patch_embed.py ...``: :mod:`vitfast.cli.kernels.patch_embed` from a checkout
(``--help`` for its options)."""

import os
import sys

import torch

if not torch.cuda.is_available():  # the Triton kernels run interpreted without a GPU: set before vitfast loads
    os.environ.setdefault("TRITON_INTERPRET", "1")

from vitfast.cli.kernels.patch_embed import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
