"""radalign core: config loading, logging, atomic I/O and the `radalign` command.

The stages live in the top-level packages `data`, `pretrain`, `zeroshot`, `retrieval` and `finetune`;
this package holds only what all of them share.
"""

__version__ = "0.1.0"


class RadalignError(Exception):
    """An error caused by user input (config, paths, data). The CLI prints it without a traceback."""
