"""radalign retrieval stage."""
