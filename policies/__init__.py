"""Who decides which tokens survive: the per-token policy (its networks in plain torch, their RLModule for
training and its distribution), the heuristics, how the two agents' decisions combine, the warm start, and
policy checkpoints."""
