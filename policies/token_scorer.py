"""The per-token scoring network both agents use, in plain torch: what inference runs, without Ray.

Training wraps these networks in an RLlib module (``policies.rl_module.TokenPolicyModule``, which adds the
action distribution and PPO's value function); evaluation and deployment load the same weights into
:class:`TokenScorer` (``policies.export``), so a pruned ViT needs torch, not Ray. Both classes take their
networks and scoring from :class:`TokenScoring`, so they hold the same parameters under the same names.

The network is shared across tokens and sees the others only through a masked-mean context, so it works for
any number of live tokens and permuting the live rows permutes its outputs. Its observations come from
``envs.vit.features.observe``, which has already replaced non-finite values.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import nn

DEFAULT_HIDDEN = 64
DEAD_SCORE = -1e4
"""The score of a dead token: ``exp`` of it is 0 in float32, so no set ever holds one."""
_NETWORKS = ("token_net", "logit_net", "value_head")


class TokenEmbeddings(NamedTuple):
    """The token network's output, on the live tokens only or on every row (:meth:`TokenScoring.token_scores`'s
    ``every_row``)."""

    emb: torch.Tensor
    """``[L, h]``: the embeddings of the ``L`` live tokens, row by row; or ``[..., N, h]``, of every row."""
    index: tuple[torch.Tensor, torch.Tensor] | None
    """``([L], [L])``: the flat row (leading dimensions flattened) and the column of each live token; None when
    ``emb`` holds every row."""
    context: torch.Tensor
    """``[..., h]``: the mean live embedding of each row (a zero vector if none is live)."""


class TokenScoring:
    """The networks (a token MLP, a logit MLP over each token beside its row's context, a value head) and the
    scores they give; mixed into an ``nn.Module``, which :meth:`_build_networks` fills."""

    _token_net: nn.Sequential
    _logit_net: nn.Sequential
    _value_head: nn.Sequential

    token_shape: tuple[int, int]
    """``(N, F)``: the patch tokens and the features per token it observes (what its backbone and features
    must give)."""
    hidden: int
    """The networks' width."""

    def _build_networks(self, num_patches: int, num_features: int, hidden: int) -> None:
        self.token_shape, self.hidden = (num_patches, num_features), hidden
        self._token_net = nn.Sequential(
            nn.Linear(num_features, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU())
        self._logit_net = nn.Sequential(nn.Linear(2 * hidden, hidden), nn.ReLU(), nn.Linear(hidden, 1))
        self._value_head = nn.Sequential(nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 1))
        with torch.no_grad():  # small last layer: every set starts about equally likely
            self._logit_net[-1].weight.mul_(0.01)
        self._register_load_state_dict_pre_hook(_accept_unprefixed_names)

    def macs_per_token(self) -> int:
        """Multiply-accumulates of one inference forward per live token: the token MLP and the logit MLP (the
        masked mean and activations are negligible; the value head never runs at inference)."""
        return sum(layer.in_features * layer.out_features
                   for net in (self._token_net, self._logit_net) for layer in net if isinstance(layer, nn.Linear))

    def _embed(self, obs: dict[str, torch.Tensor], every_row: bool = False) -> TokenEmbeddings:
        """The token embeddings and each row's live-token context: of the live tokens only (in training most
        rows are dead after the first pruning point, and the token network is most of the module's cost on the
        CPU), or of ``every_row`` (no data-dependent shapes, nothing read back from a GPU)."""
        live = obs["live"] > 0.5
        if every_row:
            emb = self._token_net(obs["tokens"])
            context = (emb * live.unsqueeze(-1)).sum(-2) / live.sum(-1, keepdim=True).clamp(min=1)
            return TokenEmbeddings(emb, None, context)
        flat_live = live.reshape(-1, live.shape[-1])
        rows, columns = flat_live.nonzero(as_tuple=True)
        emb = self._token_net(obs["tokens"].reshape(*flat_live.shape, -1)[rows, columns])
        total = emb.new_zeros(flat_live.shape[0], emb.shape[-1]).index_add(0, rows, emb)
        context = total / flat_live.sum(-1, keepdim=True).clamp(min=1)
        return TokenEmbeddings(emb, (rows, columns), context.reshape(*live.shape[:-1], -1))

    def _scores(self, obs: dict[str, torch.Tensor], embedded: TokenEmbeddings) -> torch.Tensor:
        """``[..., N]``: the logit net's score of each live token beside its row's context; dead tokens get
        :data:`DEAD_SCORE`."""
        live = obs["live"]
        if embedded.index is None:
            context = embedded.context.unsqueeze(-2).expand_as(embedded.emb)
            scores = self._logit_net(torch.cat([embedded.emb, context], dim=-1)).squeeze(-1)
            return scores.masked_fill(live <= 0.5, DEAD_SCORE)
        rows, columns = embedded.index
        context = embedded.context.reshape(-1, embedded.context.shape[-1])
        live_scores = self._logit_net(torch.cat([embedded.emb, context[rows]], dim=-1)).squeeze(-1)
        scores = live_scores.new_full((context.shape[0], live.shape[-1]), DEAD_SCORE)
        return scores.index_put((rows, columns), live_scores).reshape(live.shape)

    def token_scores(self, tokens: torch.Tensor, live: torch.Tensor, every_row: bool = False) -> torch.Tensor:
        """The scores ``[..., N]`` of tokens with features ``tokens [..., N, F]`` and live mask ``live [..., N]``
        (the deterministic policy keeps the ``count`` highest). ``every_row`` runs the networks on the dead rows
        too, which pays where few are dead (an exact budget's states) and reads nothing back from a GPU; the
        scores are the same. The features are computed in float32 whatever the backbone's precision
        (``envs.vit.features``); they are cast to the networks' own, so a module cast to bfloat16 scores them."""
        dtype = self._token_net[0].weight.dtype
        obs = {"tokens": tokens.to(dtype), "live": live.to(dtype)}
        return self._scores(obs, self._embed(obs, every_row))


class TokenScorer(TokenScoring, nn.Module):
    """One agent's trained networks for inference, built from what an export records (``policies.export``):
    torch alone, no RLlib or gymnasium."""

    def __init__(self, num_patches: int, num_features: int, hidden: int = DEFAULT_HIDDEN) -> None:
        super().__init__()
        self._build_networks(num_patches, num_features, hidden)


def _accept_unprefixed_names(state_dict: dict[str, torch.Tensor], prefix: str, *args: Any) -> None:
    """Load states that name the networks without the leading underscore, as older checkpoints do."""
    for key in list(state_dict):
        name = key[len(prefix):]
        if key.startswith(prefix) and name.split(".")[0] in _NETWORKS:
            state_dict[f"{prefix}_{name}"] = state_dict.pop(key)
