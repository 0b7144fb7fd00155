"""`python -m radalign.finetune` (and `accelerate launch -m radalign.finetune`) is `radalign finetune`."""

import sys

from radalign.cli import stage_main

if __name__ == "__main__":
    sys.exit(stage_main("finetune"))
