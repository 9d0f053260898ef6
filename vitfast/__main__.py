"""``python -m vitfast <command> ...``: the ``vitfast`` command (same as ``python -m vitfast.cli``)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
