"""``vitfast tune``: measure which path (vitfast's kernel or PyTorch's) each op of a model should
take on this GPU, at the model's real shapes, and write the dispatch cache.

    vitfast tune --model vit_base_patch16_224 --batch-size 256 --dtype bf16            # inference
    vitfast tune --model vit_large_patch16_224 --batch-size 128 --dtype bf16 --train   # training
    vitfast tune ... --dry-run        # print the choices, write nothing

Inference runs the model's weights in ``--dtype``; training keeps fp32 weights under autocast to
``--dtype`` (as ``vitfast bench`` does). The cache is ``~/.cache/vitfast/dispatch.json``
(``VITFAST_DISPATCH_CACHE`` or ``--cache`` move it); ``vitfast info --dispatch`` shows the table in
force and where each entry came from. Each entry is written as soon as it is measured, so an
interrupted run (Ctrl-C, ``timeout -s INT``) keeps what it measured. See :mod:`vitfast.tuning`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="vitfast tune", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="a registered name (vitfast.list_models())")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--img-size", type=int, default=None, help="default: the model's")
    p.add_argument("--dtype", choices=list(DTYPES), default="bf16")
    p.add_argument("--train", action="store_true", help="tune the training (forward+backward) paths")
    p.add_argument("--cache", type=Path, default=None, help="the cache file (default: vitfast.dispatch.cache_path())")
    p.add_argument("--dry-run", action="store_true", help="measure and print, write nothing")
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--iters", type=int, default=30)
    p.add_argument("--device", default="cuda")
    args = p.parse_args(argv)
    if args.batch_size < 1:
        p.error(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.iters < 1 or args.warmup < 0:
        p.error("--iters must be >= 1 and --warmup >= 0")

    import torch

    from .. import dispatch
    from ..models import create_model, list_models
    from ..tuning import calls_summary, captured_calls, format_entries, measure

    if args.model not in list_models():
        p.error(f"unknown --model {args.model!r}; `python -c 'import vitfast; print(vitfast.list_models())'` lists them")
    device = torch.device(args.device)
    if device.type != "cuda" or not torch.cuda.is_available():
        print("vitfast tune: needs a CUDA GPU (the measured dispatch chooses between paths on CUDA only; on the CPU "
              "backend='auto' always takes the reference path)", file=sys.stderr)
        return 2
    dtype = getattr(torch, DTYPES[args.dtype])
    overrides = {"img_size": args.img_size} if args.img_size else {}
    model = create_model(args.model, **overrides).to(device)
    if not args.train:
        model = model.to(dtype)
    size = model.patch_embed.img_size
    x = torch.randn(args.batch_size, model.in_chans, size[0], size[1], device=device,
                    dtype=dtype if not args.train else torch.float32)
    calls = captured_calls(model, x, args.train, dtype if args.train else None)
    print(f"vitfast tune: {args.model}, batch {args.batch_size}, {args.dtype}, {'train' if args.train else 'infer'} "
          f"on {dispatch.device_key(device)}: {len(calls)} distinct calls {calls_summary(calls)}", flush=True)
    path = args.cache or dispatch.cache_path()
    entries = []
    try:  # each entry is in the cache once printed: a run stopped part-way keeps those
        for entry in measure(calls, cache=args.cache, write=not args.dry_run, warmup=args.warmup, iters=args.iters):
            entries.append(entry)
            print("  " + format_entries([entry]).splitlines()[1], flush=True)
    except KeyboardInterrupt:
        kept = "nothing written (--dry-run)" if args.dry_run else f"the {len(entries)} measured are in {path}"
        print(f"vitfast tune: interrupted after {len(entries)} of {len(calls)} calls; {kept}", file=sys.stderr)
        return 130
    if args.dry_run:
        print("vitfast tune: --dry-run, nothing written")
        return 0
    print(f"vitfast tune: wrote {len(entries)} entries to {path}"
          + ("" if args.cache is None else " (pass VITFAST_DISPATCH_CACHE to use it)"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
