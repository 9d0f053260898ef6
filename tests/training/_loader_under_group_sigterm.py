"""Child of test_train_safety: a DataLoader with 2 workers (worker_init_fn as vitfast train's)
in its own process group; the test sends SIGTERM to the group. The main process notes it and must
still get its next batches from live workers."""
import signal
import sys
import time

import torch
from torch.utils.data import DataLoader, Dataset

from vitfast.training.interrupt import ignore_stop_signals


class Slow(Dataset):
    def __len__(self):
        return 10_000

    def __getitem__(self, i):
        time.sleep(0.01)
        return torch.tensor([i])


got = []
signal.signal(signal.SIGTERM, lambda s, f: got.append(s))
loader = DataLoader(Slow(), batch_size=2, num_workers=2, worker_init_fn=ignore_stop_signals)
for n, _ in enumerate(loader):
    if n == 3:
        print("ready", flush=True)
    if got:
        for _, _ in zip(range(5), loader):  # the workers must still be alive
            pass
        print("survived", flush=True)
        sys.exit(0)
    time.sleep(0.01)
