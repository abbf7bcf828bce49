"""Who decides which tokens survive: the per-token policy (RLModule and its distribution), the heuristics,
how the two agents' decisions combine, the warm start, and policy checkpoints."""
