"""The training machinery every stage shares: one loop, checkpoints, typed configs, DDP set-up."""
