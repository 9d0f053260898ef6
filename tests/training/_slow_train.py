"""``vitfast train`` (``vitfast.cli.train.main``) with a sleep before every forward, so that a
test can signal the child process mid-run: ``python _slow_train.py SECONDS ARGS...``. Under
torchrun, with ``SLOW_TRAIN_PIDS=<folder>``, each rank writes its pid to ``<folder>/rank<R>``
(so that a test can signal one rank alone)."""

import os
import sys
import time

from vitfast.cli import train

if __name__ == "__main__":
    delay, argv = float(sys.argv[1]), sys.argv[2:]
    if os.environ.get("SLOW_TRAIN_PIDS"):
        path = os.path.join(os.environ["SLOW_TRAIN_PIDS"], f"rank{os.environ.get('RANK', 0)}")
        with open(path + ".tmp", "w") as f:
            f.write(str(os.getpid()))
        os.replace(path + ".tmp", path)
    real = train._to_input

    def slow(*args, **kwargs):
        time.sleep(delay)
        return real(*args, **kwargs)

    train._to_input = slow
    sys.exit(train.main(argv))
