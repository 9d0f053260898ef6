"""``python -m vitfast.cli <command> ...`` (what ``torchrun ... -m vitfast.cli train`` runs)."""

import sys

from . import main

sys.exit(main())
