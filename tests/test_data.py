"""The data module: split sizes and labels on the shared CIFAR-10 copy, and clear errors."""

import numpy as np
import pytest
import torch

from envs.vit.data import DataError, StreamedImages, load_split, split_indices


def test_val_split_is_seeded_and_disjoint_from_train():
    train = split_indices(1000, "train", 100, seed=0)
    val = split_indices(1000, "val", 100, seed=0)
    assert len(train) == 900 and len(val) == 100
    assert not set(train) & set(val)
    assert np.array_equal(val, split_indices(1000, "val", 100, seed=0))
    assert not np.array_equal(val, split_indices(1000, "val", 100, seed=1))


def test_test_split_sizes_and_labels(data_dir):
    test = load_split("cifar10", "test", data_dir)
    assert test.images.shape == (10000, 3, 32, 32) and str(test.images.dtype) == "torch.uint8"
    assert np.bincount(test.labels.numpy()).tolist() == [1000] * 10
    assert test.class_names[:3] == ("airplane", "automobile", "bird")


def test_train_val_limit_is_a_mixed_subset(data_dir):
    val = load_split("cifar10", "val", data_dir, limit=200)
    assert len(val) == 200
    assert len(set(val.labels.tolist())) == 10  # a seeded subset, not the first (class-sorted) images
    again = load_split("cifar10", "val", data_dir, limit=200)
    assert (again.images == val.images).all()


def test_folder_dataset_reads_an_imagefolder_tar(data_dir, tmp_path):
    (tmp_path / "train.tar").symlink_to(data_dir / "cifar10" / "train.tar")
    (tmp_path / "test.tar").symlink_to(data_dir / "cifar10" / "test.tar")
    split = load_split("folder", "test", tmp_path, limit=10)
    assert split.images.shape == (10, 3, 32, 32)


def test_missing_dataset_offline_gives_clear_error(tmp_path):
    with pytest.raises(DataError, match="cifar10 not found"):
        load_split("cifar10", "test", tmp_path, download=False)
    with pytest.raises(DataError, match="does not exist"):
        load_split("cifar10", "test", tmp_path / "nope")
    with pytest.raises(DataError, match="unknown data set"):
        load_split("mnist", "test", tmp_path)
    with pytest.raises(DataError, match="unknown split"):
        load_split("cifar10", "validation", tmp_path)


def test_a_split_over_the_memory_budget_streams_the_same_pixels(image_folder_224):
    decoded = load_split("folder", "train", image_folder_224, input_size=224, val_size=6)
    streamed = load_split("folder", "train", image_folder_224, input_size=224, val_size=6, memory_budget_mb=1)
    assert isinstance(decoded.images, torch.Tensor) and isinstance(streamed.images, StreamedImages)
    assert len(streamed) == len(decoded) == 18 and torch.equal(streamed.labels, decoded.labels)
    assert torch.equal(streamed.images[3], decoded.images[3])
    assert torch.equal(streamed.images[[7, 2, 7]], decoded.images[[7, 2, 7]])
    assert torch.equal(streamed.images[torch.tensor([0, 5])], decoded.images[torch.tensor([0, 5])])
    assert torch.equal(streamed.images[4:9], decoded.images[4:9])
    for mine, theirs in zip(streamed.batches(5, workers=2), decoded.batches(5), strict=True):
        assert torch.equal(mine, theirs)
