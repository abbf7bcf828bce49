"""PPO's learner, with the advantages standardised over the steps the loss counts.

RLlib appends an artificial step to every agent episode (``AddOneTsToEpisodesAndTruncate``) so that GAE can
bootstrap, and masks it out of the loss (``Columns.LOSS_MASK``). Its ``GeneralAdvantageEstimation`` then
standardises the advantages over every row, the artificial ones included (ray-project/ray#57989; Ray 2.60 does
so). Here an agent episode is one real step per pruning point (3 at the default three) and 1 artificial one, whose
value, the value head on the all-zero terminal observation, the value loss never trains; the real advantages are
small (a raw standard deviation of about 0.04), so that untrained value sets the mean and the spread: measured on
the warm start, the attention agent's real advantages had a mean of +0.49 and a standard deviation of 0.56 where
both should be 0 and 1, and its policy gradient a cosine of 0.54 with the gradient of properly standardised
advantages. :class:`LossMaskedAdvantages`, inserted right after GAE, standardises them again over the real rows;
an affine map of the standardised column, it gives exactly what standardising the raw advantages over those rows
would.
"""

from __future__ import annotations

from typing import Any

import torch
from ray.rllib.algorithms.ppo.torch.ppo_torch_learner import PPOTorchLearner
from ray.rllib.connectors.connector_v2 import ConnectorV2
from ray.rllib.connectors.learner import GeneralAdvantageEstimation
from ray.rllib.core.columns import Columns
from ray.rllib.evaluation.postprocessing import Postprocessing
from ray.rllib.utils.annotations import override

MIN_STD = 1e-4
"""The smallest standard deviation divided by, as RLlib's GAE divides (a batch whose advantages are all equal)."""


class LossMaskedAdvantages(ConnectorV2):
    """Learner connector piece: each module's advantages standardised over the rows its loss counts
    (``Columns.LOSS_MASK``), as a population standard deviation (RLlib's convention); a batch without a loss mask
    is left as it is."""

    @override(ConnectorV2)
    def __call__(self, *, batch: dict[str, dict[str, Any]], **kwargs: Any) -> dict[str, dict[str, Any]]:
        for module_batch in batch.values():
            if Postprocessing.ADVANTAGES not in module_batch or Columns.LOSS_MASK not in module_batch:
                continue
            module_batch[Postprocessing.ADVANTAGES] = masked_standardisation(
                module_batch[Postprocessing.ADVANTAGES], module_batch[Columns.LOSS_MASK].bool())
        return batch


class PruningPPOLearner(PPOTorchLearner):
    """RLlib's torch PPO learner with :class:`LossMaskedAdvantages` after its GAE piece."""

    @override(PPOTorchLearner)
    def build(self) -> None:
        super().build()
        if self._learner_connector is not None and self.config.add_default_connectors_to_learner_pipeline:
            self._learner_connector.insert_after(GeneralAdvantageEstimation, LossMaskedAdvantages())


def masked_standardisation(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``values`` standardised over the rows ``mask`` selects: what :class:`LossMaskedAdvantages` leaves."""
    counted = values[mask]
    return (values - counted.mean()) / counted.std(correction=0).clamp_min(MIN_STD)
