"""``vitfast train`` (``vitfast.cli.train.main``) with a sleep before every forward, so that a
test can signal the child process mid-run: ``python _slow_train.py SECONDS ARGS...``."""

import sys
import time

from vitfast.cli import train

if __name__ == "__main__":
    delay, argv = float(sys.argv[1]), sys.argv[2:]
    real = train._to_input

    def slow(*args, **kwargs):
        time.sleep(delay)
        return real(*args, **kwargs)

    train._to_input = slow
    sys.exit(train.main(argv))
