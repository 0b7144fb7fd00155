"""`python -m radalign.pretrain` (and `accelerate launch -m radalign.pretrain`) is `radalign pretrain`."""

import sys

from radalign.cli import stage_main

if __name__ == "__main__":
    sys.exit(stage_main("pretrain"))
