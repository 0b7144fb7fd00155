"""`python -m radalign.data` (and `accelerate launch -m radalign.data`) is `radalign data`."""

import sys

from radalign.cli import stage_main

if __name__ == "__main__":
    sys.exit(stage_main("data"))
