"""Where the training state lives: FSDP2 shards on the mesh of ``--device`` (not the host's
accelerator), and a resumed optimizer keeps AdamW's ``step`` counters on the CPU."""

import types

import pytest
import torch
import torch.nn as nn

from vitfast.training import dist as vdist
from vitfast.training.checkpoint import resume_checkpoint, save_checkpoint
from vitfast.training.dist import DistEnv, cleanup, setup, unwrap, wrap_model


class _Tiny(nn.Module):
    """Embedding, ``.blocks`` (what --dist fsdp shards one by one), head."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(8, 16)
        self.blocks = nn.ModuleList(nn.Linear(16, 16) for _ in range(2))
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        x = self.embed(x)
        for block in self.blocks:
            x = x + torch.tanh(block(x))
        return self.head(x)


@pytest.fixture
def cpu_env():
    env = setup("cpu")  # a one-process gloo group
    try:
        yield env
    finally:
        cleanup()


def _record_fully_shard(monkeypatch, forward):
    calls = []

    def recorder(module, **kw):
        calls.append((module, kw))
        return forward(module, **kw) if forward else module

    monkeypatch.setattr(vdist, "fully_shard", recorder)
    return calls


def test_fsdp_shards_on_the_cpu_mesh_on_a_gpu_host(cpu_env, monkeypatch):
    """--device cpu on a host whose accelerator is CUDA: fully_shard's default mesh would be a CUDA
    one (parameters moved to cuda:<current>, batches on the CPU); every call gets the CPU mesh."""
    monkeypatch.setattr(torch._C, "_get_accelerator", lambda: torch.device("cuda"))  # a GPU host
    calls = _record_fully_shard(monkeypatch, vdist.fully_shard)
    model = wrap_model(_Tiny(), "fsdp", cpu_env)
    assert [m for m, _ in calls] == [*model.blocks, model]
    (mesh,) = {id(kw["mesh"]): kw["mesh"] for _, kw in calls}.values()  # one mesh for all
    assert mesh.device_type == cpu_env.device.type == "cpu" and mesh.size() == cpu_env.world_size
    assert all(p.device.type == "cpu" for p in model.parameters())
    model(torch.randn(3, 8)).sum().backward()  # batches on the CPU meet parameters on the CPU


@pytest.mark.parametrize("param_dtype", [None, torch.bfloat16])
def test_fsdp_mesh_on_cuda_is_the_ranks_device(monkeypatch, param_dtype):
    """A CUDA env (faked: no GPU needed): the mesh is built on "cuda" over all ranks after the
    rank's device is made current (fully_shard shards onto the current device), and every
    fully_shard call gets it, with the mixed-precision policy when there is one."""
    events = []
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: events.append(("set_device", torch.device(d))))

    def fake_mesh(device_type, shape):
        events.append(("mesh", device_type, tuple(shape)))
        return types.SimpleNamespace(device_type=device_type, shape=tuple(shape))

    monkeypatch.setattr(vdist, "init_device_mesh", fake_mesh)
    calls = _record_fully_shard(monkeypatch, None)

    class OnCuda(_Tiny):
        def to(self, *args, **kwargs):  # the parameters stay put: this host has no GPU
            return self

    env = DistEnv(rank=3, world_size=4, local_rank=1, device=torch.device("cuda", 1), backend="nccl", launched=True)
    model = wrap_model(OnCuda(), "fsdp", env, param_dtype=param_dtype)
    assert events == [("set_device", torch.device("cuda", 1)), ("mesh", "cuda", (4,))]
    assert [m for m, _ in calls] == [*model.blocks, model]
    assert all(kw["mesh"].device_type == "cuda" for _, kw in calls)
    assert len({id(kw["mesh"]) for _, kw in calls}) == 1
    assert all(("mp_policy" in kw) == (param_dtype is not None) for _, kw in calls)


def _steps(model, optimizer, scheduler, n, seed):
    g = torch.Generator().manual_seed(seed)
    losses = []
    for _ in range(n):
        x, y = torch.randn(6, 8, generator=g), torch.randn(6, 4, generator=g)
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        losses.append(loss.item())
    return losses


def _trainer(env, mode, seed):
    torch.manual_seed(seed)
    model = wrap_model(_Tiny(), mode, env)
    optimizer = torch.optim.AdamW(unwrap(model).parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 / (1 + s))
    return model, optimizer, scheduler


def _local(t):
    return t.to_local() if hasattr(t, "to_local") else t


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_resumed_adamw_keeps_its_step_counters_on_the_cpu(cpu_env, tmp_path, monkeypatch, mode):
    """state.pt is read onto the CPU (on CUDA, AdamW's `step` tensors loaded there would stay there
    and cost a host sync per parameter per step); the resumed run continues bit for bit."""
    model, optimizer, scheduler = _trainer(cpu_env, mode, seed=0)
    _steps(model, optimizer, scheduler, 2, seed=1)
    ckpt = save_checkpoint(str(tmp_path), 2, model=model, optimizer=optimizer, scheduler=scheduler, scaler=None,
                           env=cpu_env, mode=mode, args={})
    after = _steps(model, optimizer, scheduler, 3, seed=2)

    loads = []
    real_load = torch.load

    def recording_load(f, *args, **kwargs):
        loads.append((f if isinstance(f, str) else None, kwargs.get("map_location")))
        return real_load(f, *args, **kwargs)

    monkeypatch.setattr(torch, "load", recording_load)
    model2, optimizer2, scheduler2 = _trainer(cpu_env, mode, seed=9)
    assert resume_checkpoint(ckpt, model=model2, optimizer=optimizer2, scheduler=scheduler2, scaler=None,
                             env=cpu_env, mode=mode) == 2
    monkeypatch.setattr(torch, "load", real_load)

    state_loads = [loc for f, loc in loads if f and f.endswith("state.pt")]
    assert state_loads == (["cpu"] if mode == "ddp" else [])  # FSDP reads dcp/ instead
    assert all(loc == "cpu" for f, loc in loads if f)  # meta.pt and rng/ too
    for p in unwrap(model2).parameters():
        st = optimizer2.state[p]
        assert st["step"].device.type == "cpu" and float(st["step"]) == 2
        assert st["exp_avg"].device == p.device and st["exp_avg_sq"].device == p.device
    assert _steps(model2, optimizer2, scheduler2, 3, seed=2) == after
    for p, q in zip(unwrap(model).parameters(), unwrap(model2).parameters()):
        assert torch.equal(_local(p), _local(q))
