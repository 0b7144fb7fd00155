"""`python -m radalign.retrieval` (and `accelerate launch -m radalign.retrieval`) is `radalign retrieval`."""

import sys

from radalign.cli import stage_main

if __name__ == "__main__":
    sys.exit(stage_main("retrieval"))
