"""radalign data stage."""
