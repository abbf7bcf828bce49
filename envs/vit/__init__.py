"""The prunable ViT, pure torch (no Ray): read data and backbones, run a timm ViT in stages, prune between
them, and count what it costs. The data path, in import order::

    data, held_out, backbone_checkpoint -> staged_vit -> token_ops, token_merge, flops -> pruned_forward -> features

ToMe's merging in every block (``tome``) is the training-free method evaluate.py compares with; backbone.py's
augmentation on the device (``augment``), the ``--device`` names and precisions (``device``), the project's
one timer (``timing``) and its one count of accuracy and agreement in percent (``scoring``) serve the commands.
"""
