"""Who decides which tokens survive: the per-token policy (its networks in plain torch, ``token_scorer``; their
RLModule for training, ``rl_module``, and its distribution, ``distribution``), the heuristics (``heuristics``),
how the two agents' decisions combine (``decisions``), the warm start (``warm_start``), sampling the next batch
while the learner updates (``sample_ahead``), policy checkpoints (``checkpoints`` reads them, ``export`` writes
their pickle-free export), and the models that run a policy or a heuristic for inference (``pruned_vit``,
``cascade``)."""
