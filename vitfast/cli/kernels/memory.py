"""Peak GPU memory of the attention against N: vitfast's kernel vs SDPA (math and the
fastest backend), forward and forward+backward.

    python -m vitfast.cli.kernels.memory --json benchmarks/results/

One row per (impl, mode, N) with the peak bytes allocated *above the inputs* (q, k, v,
dout), that figure divided by one N x N score matrix of the batch (``extra_per_nxn``: ~0
for a kernel that keeps scores on chip, >= 1 for one that materialises them), and the
ratio to the previous N (2 = linear, 4 = quadratic); ``status`` is ``ok``, ``oom`` or
``failed``, with ``error`` saying why. Default shapes: ViT-L heads (H = 16,
D = 64), B = 4, N = 512 .. 4096 (N = 4096 is the issue's row). GPU only: on the CPU it says
so and writes nothing (the CPU check is tests/ops/test_attention_memory.py).
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

import torch

from .. import benchmarking as bu
from ...ops.attention import attention

IMPLS = ("vitfast", "sdpa", "sdpa_math")


def _run(impl: str, q, k, v):
    if impl == "vitfast":
        return attention(q, k, v, backend="triton")
    if impl == "sdpa_math":
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel(SDPBackend.MATH):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v)
    return torch.nn.functional.scaled_dot_product_attention(q, k, v)


def measure(impl: str, mode: str, B: int, H: int, N: int, D: int, dtype: torch.dtype) -> dict:
    grad = mode == "fwd+bwd"
    q, k, v = (torch.randn(B, H, N, D, device="cuda", dtype=dtype, requires_grad=grad) for _ in range(3))
    dout = torch.randn(B, H, N, D, device="cuda", dtype=dtype)

    def step():
        with torch.set_grad_enabled(grad):
            out = _run(impl, q, k, v)
            if grad:
                out.backward(dout)
        return out

    try:
        step()  # warm-up: autotuning and allocator caches outside the measurement
        for t in (q, k, v):
            t.grad = None
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        extra = torch.cuda.max_memory_allocated() - base
        row = {"peak_extra_bytes": int(extra), "status": "ok", "error": None}
    except torch.OutOfMemoryError as e:
        row = {"peak_extra_bytes": None, "status": "oom", "error": f"OutOfMemoryError: {str(e).splitlines()[0]}"}
    except Exception as e:  # noqa: BLE001  (said in the row: the other rows are still measured)
        row = {"peak_extra_bytes": None, "status": "failed",
               "error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"}
    nxn = B * H * N * N * torch.finfo(dtype).bits // 8
    row.update(impl=impl, mode=mode, B=B, H=H, N=N, D=D, dtype=str(dtype).replace("torch.", ""),
               nxn_bytes=int(nxn), extra_per_nxn=None if row["peak_extra_bytes"] is None
               else round(row["peak_extra_bytes"] / nxn, 4))
    del q, k, v, dout
    torch.cuda.empty_cache()
    return row


def collect(Ns: Sequence[int], B: int, H: int, D: int, dtype: torch.dtype, impls=IMPLS) -> list[dict]:
    rows = []
    for impl in impls:
        for mode in ("fwd", "fwd+bwd"):
            prev = None
            for N in Ns:
                r = measure(impl, mode, B, H, N, D, dtype)
                cur = r["peak_extra_bytes"]
                r["growth_vs_prev_N"] = round(cur / prev, 3) if cur and prev else None
                prev = cur
                rows.append(r)
                print(f"{impl:<10} {mode:<8} N={N:<5} extra peak {cur if cur is None else cur / 2**20:>10} MiB  "
                      f"x N*N {r['extra_per_nxn']}  growth {r['growth_vs_prev_N']}", flush=True)
    return rows


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--N", type=int, nargs="+", default=[512, 1024, 2048, 4096])
    p.add_argument("--B", type=int, default=4)
    p.add_argument("--H", type=int, default=16)
    p.add_argument("--D", type=int, default=64)
    p.add_argument("--dtype", choices=["bf16", "fp16"], default="bf16")
    p.add_argument("--impls", nargs="+", choices=IMPLS, default=list(IMPLS))
    p.add_argument("--json", default=None, help="a results file, or a folder to write <date>_<card>_memory.json in")
    bu.add_noise_args(p)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_memory: needs a CUDA GPU (peak device memory); nothing measured", file=sys.stderr)
        return 2
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float16
    device = torch.device("cuda")
    env = bu.env_info(device, argv=sys.argv[1:] if argv is None else argv, prog="python -m vitfast.cli.kernels.memory")
    try:  # memory, not time, but the same rule as every benchmark: a busy machine is recorded as such
        with bu.load_guard(env, "bench_memory", allow_noisy=args.allow_noisy, writes=bool(args.json), device=device):
            rows = collect(args.N, args.B, args.H, args.D, dtype, args.impls)
    except bu.NoisyMachine as e:
        print(e, file=sys.stderr)
        return bu.EXIT_NOISY
    if args.json:
        print(f"wrote {bu.write_json(args.json, 'memory', env, rows)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
