"""learned_vs_warm_start scores validation images that no checkpoint was ranked on."""

import numpy as np
import pytest

from benchmarks.learned_vs_warm_start import unranked_positions
from envs.errors import UsageError
from envs.vit.data import limited_positions, load_split


def test_scored_images_are_none_of_those_train_py_ranked_checkpoints_on(data_dir):
    full = load_split("cifar10", "val", data_dir)
    ranked = limited_positions(len(full), 1000, seed=0)
    # the positions are those of the subset load_split keeps with the limit train.py passes (its val_limit)
    assert (full.images[ranked] == load_split("cifar10", "val", data_dir, limit=1000).images).all()
    scored = unranked_positions(len(full), 1000, 2000, seed=0)
    assert len(np.unique(scored)) == 2000 and len(np.intersect1d(scored, ranked)) == 0
    assert len(set(full.labels[scored].tolist())) == 10  # a seeded mix, not the first (class-sorted) images
    assert np.array_equal(unranked_positions(len(full), 1000, 10**6, seed=0), np.setdiff1d(np.arange(5000), ranked))
    assert np.array_equal(limited_positions(5000, 5000, seed=0), np.arange(5000))
    with pytest.raises(UsageError, match="ranked its checkpoints on all 5000 validation images: none is left"):
        unranked_positions(5000, 5000, 2000, seed=0)  # one error line from the command, exit code 2
