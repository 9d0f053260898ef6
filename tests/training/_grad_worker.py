"""One training step's gradients, from the trainer's own pieces (data sharding, model, wrapper).

Run under torchrun for the distributed side (``--world`` processes), or imported and called with
world 1 for the single-process reference. Rank 0 saves ``{param name: grad}`` to ``out``.
"""

import sys

import torch
import torch.nn.functional as F


def step_grads(argv, batch_size, wrap):
    from vitfast.cli.train import build_model, parse_args
    from vitfast.training.data import StepBatchSampler, load_digits
    from vitfast.training.dist import setup, unwrap, wrap_model

    a = parse_args(argv)
    env = setup("cpu")
    data = load_digits(32)
    a.patch_size = 4
    torch.manual_seed(a.seed)
    model, _ = build_model(a, data)
    if wrap:
        model = wrap_model(model, "ddp", env)
    sampler = StepBatchSampler(len(data.train), batch_size, env.rank, env.world_size, a.seed, total_steps=1)
    x, y = data.train.batch(next(iter(sampler)))
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in unwrap(model).named_parameters()}
    return env, grads


if __name__ == "__main__":
    out, batch_size, argv = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
    env, grads = step_grads(argv, batch_size, wrap=True)
    if env.rank == 0:
        torch.save(grads, out)
    torch.distributed.destroy_process_group()
