"""`python -m radalign.zeroshot` (and `accelerate launch -m radalign.zeroshot`) is `radalign zeroshot`."""

import sys

from radalign.cli import stage_main

if __name__ == "__main__":
    sys.exit(stage_main("zeroshot"))
