"""The prunable ViT, pure torch (no Ray): read data and backbones, run a timm ViT in stages, prune between
them, and count what it costs. The data path, in import order::

    data, backbone_checkpoint -> staged_vit -> token_ops, token_merge -> pruned_forward -> features, flops
"""
