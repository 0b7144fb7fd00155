"""`python -m zeroshot` (and `accelerate launch -m zeroshot`) is `radalign zeroshot`."""

import sys

from radalign.cli import stage_main

if __name__ == "__main__":
    sys.exit(stage_main("zeroshot"))
