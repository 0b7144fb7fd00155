"""radalign pretrain stage."""
