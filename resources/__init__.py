"""Side effects of tuneline: storage paths and IO, compute device and precision."""
