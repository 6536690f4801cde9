"""First-party strategies, one plugin per module, registered as ``lowmem_train.strategies`` entry points."""
