"""What happens to the patch tokens a pruning point removes: dropped, or merged into the tokens kept.

``merge`` (the default) follows ToMe (Bolya et al., 2023): every removed token is averaged into the kept
token it is most similar to (cosine similarity of the token embeddings), weighted by *size*, the number of
original patches a token already stands for; sizes add up, and the blocks after the pruning point give each
token attention in proportion to its size (``StagedViT``'s ``size`` argument, a ``log(size)`` key bias).
Removed tokens so still inform the class token, at the cost of one ``[n, k]`` similarity matrix per image
(``envs.vit.flops.merge_gflops``). ``drop`` discards them (EViT without fusion). Which tokens survive is decided
before, by a heuristic or the agents, identically in both modes; the budget and GFLOPs of the blocks are
the same. The setting is part of the pruning problem (``envs.problem``), which validates it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from envs.vit.token_ops import gather_tokens

REDUCTIONS: tuple[str, ...] = ("merge", "drop")


def reduce_tokens(x: torch.Tensor, size: torch.Tensor, live: torch.Tensor, keep_index: torch.Tensor,
                  live_after: torch.Tensor, num_prefix: int, reduction: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The tokens after a pruning point: prefix tokens, then the kept patch tokens (removed ones merged in).

    Args:
        x: ``[B, P + N, D]`` tokens, prefix first.
        size: ``[B, N]`` original patches each patch token stands for (all 1 before the first merge).
        live: ``[B, N]`` bool, real (not padded) patch tokens.
        keep_index: ``[B, K]`` long, the kept patch tokens (``envs.vit.token_ops.pack_keep_mask``).
        live_after: ``[B, K]`` bool, False on padded entries of ``keep_index``.
        num_prefix: ``P``.
        reduction: ``"merge"`` or ``"drop"``.

    Returns:
        ``x [B, P + K, D]`` and ``size [B, K]`` (1 on padded entries). With ``merge``, every live patch
        token not kept is added into its most similar kept token, so the sizes of each image's live tokens
        still sum to its original patch count.
    """
    kept = gather_tokens(x, keep_index, num_prefix)
    kept_size = size.gather(1, keep_index).masked_fill(~live_after, 1.0)
    if reduction == "drop":
        return kept, kept_size
    patches, kept_patches = x[:, num_prefix:], kept[:, num_prefix:]
    # Padded entries of keep_index point at token 0: count real entries only, so token 0 is kept only if chosen.
    is_kept = torch.zeros_like(live, dtype=torch.int32).scatter_add(1, keep_index, live_after.int()) > 0
    removed = (live & ~is_kept).to(x.dtype)
    similarity = F.normalize(patches.float(), dim=-1) @ F.normalize(kept_patches.float(), dim=-1).transpose(1, 2)
    target = similarity.masked_fill(~live_after.unsqueeze(1), float("-inf")).argmax(dim=-1)  # [B, N]
    weight = (size.to(x.dtype) * removed).unsqueeze(-1)  # [B, N, 1]: 0 for kept and dead tokens
    total = kept_patches * kept_size.to(x.dtype).unsqueeze(-1)
    total = total.scatter_add(1, target.unsqueeze(-1).expand_as(patches), patches * weight)
    merged_size = kept_size.scatter_add(1, target, weight.squeeze(-1).to(kept_size.dtype))
    merged = total / merged_size.to(x.dtype).unsqueeze(-1)
    return torch.cat([kept[:, :num_prefix], merged], dim=1), merged_size
