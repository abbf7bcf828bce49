"""The pruning problem and its RL environment.

``envs.vit`` is the prunable ViT in pure torch (data, backbone checkpoints, the staged forward, token
operations, features, GFLOPs, the pruned step); the modules here turn it into an RLlib problem: what defines
it (``problem``), batched episodes (``pruning_engine``), the shared Ray actor (``vit_server``; what defines
one, without Ray: ``server_settings``), the ``MultiAgentEnv`` (``pruning_env``) and its metrics
(``episode_metrics``). Beside them, what every command shares: the user-error types and the one line a message
is printed as (``errors``), and files replaced whole (``atomic_file``).
"""
