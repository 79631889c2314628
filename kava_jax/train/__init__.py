"""Training: mesh and sharding rules, optimizer, train state and step, checkpoints, set-up, CLI, TPU plans."""
