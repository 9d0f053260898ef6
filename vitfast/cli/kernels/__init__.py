"""The kernel microbenchmarks, one module per op family (``python -m vitfast.cli.kernels.<name>``,
or all of them with ``vitfast bench kernels``): each defines its cases and implementations and
times them with :mod:`vitfast.cli.benchmarking` (alternately, round by round; refusing a busy
machine). Without a GPU the Triton kernels need ``TRITON_INTERPRET=1`` set before vitfast is
imported: ``vitfast bench kernels`` and the scripts in ``benchmarks/`` set it.

    attention    the Triton attention against every SDPA backend (TFLOP/s)
    patch_embed  the fused patch embedding against the chains it replaces (GB/s, roofline)
    fused        the fused block epilogues (LayerNorm, bias+GELU, LayerScale residual) (GB/s)
    memory       peak GPU memory of the attention against N
"""

NAMES = ("attention", "patch_embed", "fused", "memory")
