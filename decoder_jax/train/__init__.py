"""Training: mesh and sharding rules, optimizer, train state, steps, checkpoints, loop."""
