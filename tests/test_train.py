"""train.py end to end on a tiny backbone: training, checkpoints, --resume (also with other worker counts)."""

import json

import pytest
import torch
from ray.rllib.core.rl_module.rl_module import RLModule

import train
from policies.checkpoints import latest_checkpoint, list_checkpoints, module_path, read_checkpoint_info
from policies.export import load_exported_policies


def run(tmp_path, tiny_backbone, data_dir, *extra):
    return train.main(["--backbone", str(tiny_backbone), "--data-dir", str(data_dir), "--train-limit", "128",
                       "--val-limit", "16", "--prune-points", "1,2,3", "--images-per-env", "4",
                       "--train-batch-size-per-learner", "32", "--minibatch-size", "32", "--num-epochs", "1",
                       "--num-cpus", "2", "--output-dir", "run", *extra])  # relative, as in the quick start


def weights(checkpoint, policy):
    return RLModule.from_checkpoint(str(module_path(checkpoint, policy))).state_dict()


@pytest.mark.slow
def test_train_checkpoint_and_resume(tmp_path, tiny_backbone, data_dir, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert run(tmp_path, tiny_backbone, data_dir, "--iterations", "2", "--checkpoint-every", "1",
               "--num-workers", "0") == 0
    out = capsys.readouterr().out
    assert "iter    1" in out and "iter    2" in out and "agree" in out and "GFLOPs" in out
    assert out.count("| val exact ") == 2  # every iteration validated (--checkpoint-every 1)
    assert "elapsed" in out and "left" in out
    best = json.loads((tmp_path / "run" / "best.json").read_text())
    assert f"best checkpoint: run/{best['checkpoint']} (best on validation: iteration {best['iteration']}" in out
    assert f"evaluate it: python evaluate.py --checkpoint run/{best['checkpoint']} --data-dir {data_dir}" in out
    first = latest_checkpoint(tmp_path / "run")
    info = read_checkpoint_info(first)
    assert info.iteration == 2 and info.problem.target_ratio == 0.5 and info.problem.reduction == "merge"
    assert info.problem.prune_points == (1, 2, 3) and info.problem.ppo.minibatch_size == 32
    exported, exported_info = load_exported_policies(first)  # every checkpoint carries its policy export
    assert exported_info == info
    for policy, module in exported.items():
        trained = weights(first, policy)
        assert all(torch.equal(module.state_dict()[k], trained[k]) for k in trained)
    assert best["iteration"] in (1, 2) and 0 <= best["val_score"] <= 100  # exact-budget accuracy, %
    assert (tmp_path / "run" / "progress.csv").read_text().count("\n") == 3  # header + 2 iterations
    assert list((tmp_path / "run" / "tb").iterdir())

    # a second start without --resume refuses to touch the run
    assert run(tmp_path, tiny_backbone, data_dir, "--iterations", "2") == 2
    assert "--resume" in capsys.readouterr().err

    # resume with another worker count and nothing left to do: same iteration counter, same weights
    assert run(tmp_path, tiny_backbone, data_dir, "--iterations", "2", "--num-workers", "1", "--resume") == 0
    assert "resumed from" in capsys.readouterr().out
    again = latest_checkpoint(tmp_path / "run")
    assert read_checkpoint_info(again).iteration == 2
    for policy in ("attention", "similarity"):
        before, after = weights(first, policy), weights(again, policy)
        assert all(torch.equal(before[k], after[k]) for k in before)

    # and one more iteration continues the count
    assert run(tmp_path, tiny_backbone, data_dir, "--iterations", "3", "--num-workers", "1", "--resume") == 0
    assert read_checkpoint_info(latest_checkpoint(tmp_path / "run")).iteration == 3
    assert [p.name for p in list_checkpoints(tmp_path / "run")][-1] == "iter_000003"


def test_bad_settings_exit_cleanly_without_writing(tmp_path, capsys):
    for flags in (["--target-ratio", "1.5"], ["--num-workers", "-1"], ["--prune-points", "a,b"],
                  ["--resume"], ["--reduction", "prune"], ["--iterations", "many"]):
        assert train.main(["--output-dir", str(tmp_path / "run"), *flags]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("command", ["train", "evaluate"])
def test_without_data_offline_one_line_says_where_to_put_it(command, tmp_path, monkeypatch, capsys):
    """No data and no network: the download is tried (as on a fresh clone), then one line names the layout
    looked for, --data-dir and MARL_PRUNING_DATA_DIR."""
    from urllib.error import URLError

    import torchvision.datasets.cifar

    import evaluate

    def offline(*args, **kwargs):
        raise URLError("[Errno -2] Name or service not known")

    monkeypatch.setattr(torchvision.datasets.cifar, "download_and_extract_archive", offline)
    monkeypatch.delenv("MARL_PRUNING_DATA_DIR", raising=False)
    monkeypatch.chdir(tmp_path)
    main = train.main if command == "train" else evaluate.main
    assert main([]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: cifar10 not found in data and could not be downloaded") and err.count("\n") == 1
    assert "data/cifar10/train.tar" in err and "--data-dir" in err and "MARL_PRUNING_DATA_DIR" in err
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize(("servers", "gpus", "driver_gpu", "expected"), [
    (None, 0, False, train.Placement(1, 0.0, 2, False, 0.0)),  # CPU only: the learner in the driver
    (3, 0, False, train.Placement(3, 0.0, 2, False, 0.0)),
    (None, 1, True, train.Placement(1, 0.5, 2, False, 0.5)),  # one GPU shared by learner and two servers
    (None, 4, False, train.Placement(4, 0.5, 2, True, 0.5)),  # GPU-less head: the learner is an actor
    (4, 1, False, train.Placement(4, 0.1, 2, True, 0.5)),
])
def test_placement(servers, gpus, driver_gpu, expected):
    placement = train.plan_placement(servers, 2, gpus, driver_gpu)
    assert placement == expected
    reserved = placement.server_gpus * (placement.servers + 1) + placement.learner_gpus * placement.learner_actor
    assert reserved <= max(gpus, 0) + 1e-9  # never more than the cluster has: nothing waits forever
