"""A stand-in for torch.cuda's device and stream state, for CPU tests of code that must put its GPU
work on the right device and stream (a model on cuda:1 while cuda:0 is current).

It keeps what the real API keeps: a current device; a current stream per device, which is where
the work on that device's tensors goes (:meth:`FakeCuda.work`); ``torch.cuda.stream(s)`` making
``s``'s device current too, as ``torch.cuda.set_stream`` does; an event recording on the stream it
is given, else on the current device's; ``torch.cuda.graph`` capturing on the stream it is given,
else on one side stream made on the device that was current at its first use (torch's class-level
``default_capture_stream``). Waits, synchronizes, event records, work and replays are logged, in
order, in ``FakeCuda.log``.
"""

from __future__ import annotations

import contextlib
import itertools

import torch

PATCHED = ("current_device", "device", "Stream", "current_stream", "stream", "synchronize", "Event",
           "CUDAGraph", "graph", "empty_cache")


class FakeStream:
    def __init__(self, cuda: "FakeCuda", index: int, name: str):
        self.cuda, self.index, self.name = cuda, index, name

    @property
    def device(self) -> torch.device:
        return torch.device("cuda", self.index)

    def wait_stream(self, other: "FakeStream") -> None:
        self.cuda.log.append(("wait", self, other))

    def __repr__(self) -> str:
        return f"<{self.name} stream on cuda:{self.index}>"


class FakeCuda:
    def __init__(self, count: int = 2, current: int = 0):
        self.current = current
        self.default = [FakeStream(self, i, "default") for i in range(count)]
        self.streams = dict(enumerate(self.default))  # the current stream of each device
        self.default_capture_stream = None
        self.log: list = []
        self._names = itertools.count()
        cuda = self

        class Event:
            def __init__(self, enable_timing: bool = False, **_):
                self.stream = None

            def record(self, stream=None):
                self.stream = stream if stream is not None else cuda.current_stream()
                cuda.log.append(("record", self.stream))

            def elapsed_time(self, end: "Event") -> float:
                return 1.0

        class CUDAGraph:
            def __init__(self, *_, **__):
                self.capture_stream = None

            def capture_begin(self):
                self.capture_stream = cuda.current_stream()

            def replay(self):
                cuda.log.append(("replay", cuda.current, self))

        class graph:
            def __init__(self, cuda_graph, pool=None, stream=None, **_):
                if stream is None and cuda.default_capture_stream is None:
                    cuda.default_capture_stream = cuda.Stream()  # on the current device, as torch's
                self.cuda_graph = cuda_graph
                self.stream_ctx = cuda.stream(stream if stream is not None else cuda.default_capture_stream)

            def __enter__(self):
                cuda.synchronize()
                self.stream_ctx.__enter__()
                self.cuda_graph.capture_begin()

            def __exit__(self, *exc):
                self.stream_ctx.__exit__(*exc)

        self.Event, self.CUDAGraph, self.graph = Event, CUDAGraph, graph

    def index(self, device=None) -> int:
        if device is None:
            return self.current
        if isinstance(device, int):
            return device
        device = torch.device(device)
        assert device.type == "cuda", device
        return self.current if device.index is None else device.index

    def current_device(self) -> int:
        return self.current

    @contextlib.contextmanager
    def device(self, device):
        saved, self.current = self.current, self.index(device)
        try:
            yield
        finally:
            self.current = saved

    def Stream(self, device=None, priority: int = 0) -> FakeStream:
        return FakeStream(self, self.index(device), f"side{next(self._names)}")

    def current_stream(self, device=None) -> FakeStream:
        return self.streams[self.index(device)]

    @contextlib.contextmanager
    def stream(self, stream: FakeStream):
        saved_device, saved = self.current, dict(self.streams)
        self.current, self.streams[stream.index] = stream.index, stream
        try:
            yield
        finally:
            self.current, self.streams = saved_device, saved

    def synchronize(self, device=None) -> None:
        self.log.append(("synchronize", self.index(device)))

    def empty_cache(self) -> None:
        pass

    def work(self, index: int) -> FakeStream:
        """A kernel on cuda:``index``'s tensors: it goes to that device's current stream."""
        stream = self.current_stream(index)
        self.log.append(("work", stream))
        return stream

    def logged(self, kind: str) -> list:
        return [entry[1:] if len(entry) > 2 else entry[1] for entry in self.log if entry[0] == kind]

    def install(self, monkeypatch) -> "FakeCuda":
        for name in PATCHED:
            monkeypatch.setattr(torch.cuda, name, getattr(self, name))
        return self
