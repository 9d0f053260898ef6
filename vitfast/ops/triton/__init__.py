"""The Triton kernels behind the ops (one module per kernel family, as flash-attention's
``flash_attn/ops/triton/``): the ``@triton.jit`` functions, their tile configs and launchers.
The ops in :mod:`vitfast.ops` register, check and dispatch; these modules only launch."""
