"""What ``backbone.py`` runs: the training step and its epochs (``training_step``), the model as the data pipeline
needs it (``model_geometry``), the splits a run reads (``splits``), the weights ``--init-from`` starts from
(``init_from``), train_state.pt, what ``--resume`` goes on from (``training_state``), ``--time-budget``
(``time_budget``), and the export's model card (``model_card``). ``backbone.py`` itself reads the command line,
settles the run's settings (a resumed run's against the recipe it recorded) and runs ``train()``'s steps."""
