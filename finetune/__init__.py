"""radalign finetune stage."""
