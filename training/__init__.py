"""What ``train.py`` runs: each trial's placement and training loop, the Ray instance, the run's directory and
its console. ``train.py`` itself plans the trials from the command line and hands them to Ray Tune."""
