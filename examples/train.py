"""Train FastViT with DDP or FSDP2: the same as ``vitfast train``.

    python examples/train.py --steps 300                              # one process, digits
    torchrun --nproc_per_node 2 examples/train.py --dist fsdp         # two processes
    python examples/train.py --help                                   # every option

See vitfast/train.py for the options and README.md ("Training") for several machines.
"""

import sys

from vitfast.cli.train import main

if __name__ == "__main__":
    sys.exit(main())
