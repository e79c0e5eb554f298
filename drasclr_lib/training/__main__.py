"""``python -m drasclr_lib.training [options]`` and ``torchrun --nproc_per_node=G -m drasclr_lib.training [options]``:
the ``drasclr pretrain`` command (:mod:`drasclr_lib.training.cli`)."""

from __future__ import annotations

import sys

from drasclr_lib.training.cli import cli_main

if __name__ == "__main__":
    sys.exit(cli_main())
