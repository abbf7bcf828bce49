"""The pruning problem: one validated value per field, a JSON round trip, older checkpoint layouts, --flags."""

from __future__ import annotations

import argparse
import dataclasses
import json

import numpy as np
import pytest
import torch

from envs.errors import UsageError
from envs.problem import (
    PPOSettings,
    ProblemError,
    PruningProblem,
    add_problem_arguments,
    check_target_ratio,
    flag_help,
    problems_from_args,
    removal_ratio,
    sweep_label,
)
from envs.vit.backbone_checkpoint import REFERENCE_BACKBONE


def test_json_round_trip_is_exact():
    problem = PruningProblem(prune_points=(2, 5), target_ratio=0.3, train_ratios=(0.1, 0.35), reduction="drop",
                             agents="similarity", train_limit=100, ppo=PPOSettings(lr=3e-4, use_kl_loss=True))
    text = json.dumps(problem.to_json())
    assert PruningProblem.from_json(json.loads(text)) == problem
    assert json.loads(text)["prune_points"] == [2, 5] and json.loads(text)["ppo"]["lr"] == 3e-4
    assert problem.ratios_trained == (0.1, 0.35) and PruningProblem(target_ratio=0.3).ratios_trained == (0.3,)


LEGACY_CONFIG = {  # pruning_config.json of the reference policy committed before PruningProblem existed
    "server": {"backbone": "reference/vit_tiny_cifar10", "dataset": "cifar10", "data_dir": "../shared/data",
               "split": "train", "limit": None, "val_size": 5000, "split_seed": 0, "prune_points": [3, 6, 9],
               "target_ratio": 0.5, "reduction": "merge", "max_batch": 256, "max_wait_ms": None, "num_gpus": 0.0,
               "num_cpus": 1.0, "torch_threads": 1, "max_restarts": 5},
    "val_limit": 1000,
    "env": {"agents": "both", "images_per_env": 8, "agree_weight": 1.0, "prob_weight": 1.0, "budget_weight": 2.0},
    "model_config": {"hidden": 64},
    "warm_start": "similarity",
    "ppo": {"lr": 0.0001, "gamma": 0.99, "lambda_": 0.95, "clip_param": 0.2, "entropy_coeff": 0.0, "num_epochs": 4,
            "minibatch_size": 128, "train_batch_size_per_learner": 256, "vf_loss_coeff": 0.5, "use_kl_loss": False,
            "grad_clip": 1.0},
    "checkpoint_every": 5, "seed": 0, "iteration": 45, "val_score": 1.5173502493184088,
}


def test_a_checkpoint_of_the_older_layout_reads_as_it_was_trained():
    config = LEGACY_CONFIG
    problem = PruningProblem.from_legacy_json(config)
    assert problem.backbone_path == REFERENCE_BACKBONE
    assert (problem.prune_points, problem.target_ratio, problem.reduction) == ((3, 6, 9), 0.5, "merge")
    assert (problem.agents, problem.images_per_env, problem.hidden, problem.warm_start) == ("both", 8, 64, "similarity")
    assert problem.checkpoint_every == 5
    assert problem.ppo == PPOSettings(**{**config["ppo"], "train_batch_size_per_learner": 256 * 8 * 2})


def test_checkpoints_record_the_turns_and_a_pair_of_former_turns_is_refused():
    """protected_share is read back; checkpoints of the first protecting turns (they know rollouts_per_image)
    protected a quarter; a pair from before those turns is refused, one agent alone is not."""
    current = PruningProblem(protected_share=0.3).to_json()
    assert PruningProblem.from_checkpoint_json({"problem": current}).protected_share == 0.3
    first_protecting = {k: v for k, v in current.items() if k != "protected_share"}
    assert PruningProblem.from_checkpoint_json({"problem": first_protecting}).protected_share == 0.25
    former = {**{k: v for k, v in first_protecting.items() if k != "rollouts_per_image"}, "reward_baseline": "distinct"}
    for config in ({"problem": former}, LEGACY_CONFIG):
        with pytest.raises(ProblemError, match="trained under turns in which the attention agent removed tokens"):
            PruningProblem.from_checkpoint_json(config)
    alone = PruningProblem.from_checkpoint_json({"problem": {**former, "agents": "similarity"}})
    assert alone.agents == "similarity"


def test_checkpoints_from_before_rollouts_and_baselines_read_as_they_were_trained():
    """One rollout of each image and no baseline, not today's defaults (4 rollouts against each other, which
    would refuse an images_per_env that 4 does not divide)."""
    former = {k: v for k, v in PruningProblem(images_per_env=6, agents="similarity", rollouts_per_image=1,
                                                reward_baseline="none").to_json().items()
              if k not in ("rollouts_per_image", "reward_baseline", "protected_share")}
    legacy = {**LEGACY_CONFIG, "env": {**LEGACY_CONFIG["env"], "agents": "similarity", "images_per_env": 2}}
    for problem in (PruningProblem.from_checkpoint_json({"problem": former}),
                    PruningProblem.from_checkpoint_json(legacy)):
        assert (problem.rollouts_per_image, problem.reward_baseline) == (1, "none")
    with_baseline = {**former, "reward_baseline": "distinct"}  # recorded from the start of baselines
    assert PruningProblem.from_checkpoint_json({"problem": with_baseline}).reward_baseline == "distinct"


def test_older_layouts_without_reduction_or_warm_start_dropped_tokens_and_started_uniform():
    problem = PruningProblem.from_legacy_json({"server": {"backbone": "b", "prune_points": [3, 6, 9],
                                                          "target_ratio": 0.4}})
    assert (problem.reduction, problem.warm_start, problem.target_ratio) == ("drop", "none", 0.4)
    with pytest.raises(ProblemError, match="lacks server.backbone"):
        PruningProblem.from_legacy_json({"server": {"backbone": "b"}})


@pytest.mark.parametrize(("change", "message"), [
    ({"target_ratio": 1.0}, r"target_ratio must be in \(0, 1\), got 1.0"),
    ({"target_ratio": 0}, r"target_ratio must be in \(0, 1\), got 0"),
    ({"reduction": "prune"}, "reduction must be one of merge, drop, got 'prune'"),
    ({"agents": "all"}, "agents must be one of both, attention, similarity"),
    ({"dataset": "mnist"}, "dataset must be one of cifar10, cifar100, folder"),
    ({"warm_start": "bc"}, "warm_start must be one of none, similarity, nms, distinct"),
    ({"images_per_env": 0}, "images_per_env must be >= 1"),
    ({"hidden": 0}, "hidden must be >= 1"),
    ({"train_limit": 0}, "train_limit must be >= 1"),
    ({"prob_weight": -1.0}, "prob_weight must be >= 0"),
    ({"reward_baseline": "greedy"}, "reward_baseline must be one of none, rollouts, random, attention"),
    ({"prune_points": ()}, "prune_points must be one or more integers"),
    ({"rollouts_per_image": 3}, "rollouts_per_image must be >= 1 and divide images_per_env = 64, got 3"),
    ({"rollouts_per_image": 1}, "reward_baseline 'rollouts' needs rollouts_per_image >= 2"),
    ({"logprob_weight": -0.5}, "logprob_weight must be >= 0"),
    ({"protected_share": 0.0}, r"protected_share must be in \(0, 1\], got 0.0"),
    ({"train_ratios": (0.1, 1.0)}, r"train_ratios must be in \(0, 1\), got 1.0"),
    ({"train_ratios": (0.3, 0.3)}, r"train_ratios must be distinct, got \(0.3, 0.3\)"),
    ({"train_ratios": (0.1, 0.3), "warm_start_images": 1}, r"at least one per training ratio \(2\)"),
    ({"agree_weight": float("inf")}, "agree_weight must be a finite number, got inf"),
    ({"protected_share": float("nan")}, "protected_share must be a finite number, got nan"),
    ({"seed": -1}, r"seed must be in \[0, 4294967295\], got -1"),
    ({"split_seed": -3}, r"split_seed must be in \[0, 4294967295\], got -3"),
    ({"seed": 2**32}, r"seed must be in \[0, 4294967295\], got 4294967296"),  # numpy's global seed's limit
    ({"val_size": 2.5}, "val_size must be an integer, got 2.5"),
    ({"hidden": True}, "hidden must be an integer, got True"),
    ({"train_limit": 10.0}, "train_limit must be an integer, got 10.0"),
    ({"prune_points": "369"}, "prune_points must be a sequence, got '369'"),
])
def test_each_field_is_validated(change, message):
    with pytest.raises(ProblemError, match=message):
        PruningProblem(**change)


@pytest.mark.parametrize(("change", "message"), [
    ({"lr": 0.0}, "lr must be > 0"), ({"gamma": 1.5}, r"gamma must be in \(0, 1\]"),
    ({"minibatch_size": 8192}, r"minibatch_size must be in \[1, train_batch_size_per_learner = 4096\]"),
    ({"num_epochs": 0}, "num_epochs must be >= 1"), ({"grad_clip": 0.0}, "grad_clip must be > 0"),
    ({"lr": float("inf")}, "lr must be a finite number"),
    ({"minibatch_size": 2.5}, "minibatch_size must be an integer"),
    ({"use_kl_loss": "no"}, "use_kl_loss must be true or false, got 'no'"),  # RLlib would read "no" as true
])
def test_ppo_settings_are_validated(change, message):
    with pytest.raises(ProblemError, match=message):
        PPOSettings(**change)


def test_a_bad_setting_is_a_usage_error_as_every_bad_argument_is():
    """A Python caller catching UsageError around PrunedViT(...) catches a bad budget too."""
    with pytest.raises(UsageError, match=r"target_ratio must be in \(0, 1\)"):
        check_target_ratio(1.5)


def test_lists_become_tuples_so_that_a_problem_hashes_and_survives_its_json_round_trip():
    """The Python API and JSON give lists; train.py keeps problems in sets."""
    problem = PruningProblem(prune_points=[2, 5], train_ratios=[0.3, 0.5])
    assert problem.prune_points == (2, 5) and problem.train_ratios == (0.3, 0.5)
    assert PruningProblem.from_json(json.loads(json.dumps(problem.to_json()))) == problem
    assert len({problem, PruningProblem(prune_points=(2, 5), train_ratios=(0.3, 0.5))}) == 1


def test_unknown_settings_are_named():
    with pytest.raises(ProblemError, match="unknown problem settings: colour"):
        PruningProblem.from_json({"colour": "blue"})
    with pytest.raises(ProblemError, match="unknown PPO settings: momentum"):
        PruningProblem.from_json({"ppo": {"momentum": 0.9}})


def test_check_target_ratio_names_what_it_checks():
    assert check_target_ratio(0.25) == 0.25
    with pytest.raises(ProblemError, match=r"--budgets must be in \(0, 1\), got 1.5"):
        check_target_ratio(1.5, "--budgets")


def test_a_budget_may_be_any_real_number_and_what_is_none_is_named_as_such():
    """numpy's float32 0.5 was refused as outside (0, 1); a tensor or a string is named for what it is."""
    assert check_target_ratio(np.float32(0.5), "budget") == 0.5 and type(check_target_ratio(np.float32(0.5))) is float
    for value, kind in ((torch.tensor(0.5), "Tensor"), ("0.5", "str"), (True, "bool")):
        with pytest.raises(ProblemError, match=rf"^budget must be a number, got .+ \({kind}\)$"):
            check_target_ratio(value, "budget")


@pytest.mark.parametrize(("text", "kept"), [("0.9999999", "1"), ("1e-7", "0")])
def test_a_removal_ratio_that_rounds_to_0_or_1_is_refused_as_it_is_parsed(text, kept):
    """Budgets are kept to 6 decimals: these passed the flag's check and failed after the data was read."""
    with pytest.raises(argparse.ArgumentTypeError, match=rf"at the 6 decimals budgets are kept to, got {text} "
                                                         rf"\({kept}\)"):
        removal_ratio(text)
    assert removal_ratio("0.333333333") == 0.333333


def test_flags_come_from_the_fields_with_their_docs_as_help(tmp_path):
    """The help of each flag is its field's doc, with the other fields it names spelled as their flags, and a
    default a user can read: not ``None``, an empty value or Python's ``False``."""
    parser = argparse.ArgumentParser()
    add_problem_arguments(parser, "pruning problem")
    help_text = " ".join(parser.format_help().split()).replace("- ", "-")  # argparse wraps after a hyphen
    for cls in (PruningProblem, PPOSettings):
        for field in dataclasses.fields(cls):
            if field.name != "ppo":
                assert " ".join(flag_help(field.metadata["doc"]).split()).replace("- ", "-") in help_text, field.name
    assert "--rollouts-per-image of each image" in help_text and "(policies/warm_start.py)" in help_text
    assert "rollouts_per_image" not in help_text and "--use-kl-loss {true,false}" in help_text
    for shown in ("None", "", "False"):
        assert f"(default: {shown})" not in help_text
    args = parser.parse_args(["--target-ratio", "0.3", "--prune-points", "2,4", "--lambda", "0.9",
                              "--use-kl-loss", "true", "--backbone", str(tmp_path)])
    (problem,) = problems_from_args(args)
    assert (problem.target_ratio, problem.prune_points, problem.ppo.lambda_, problem.ppo.use_kl_loss) == (
        0.3, (2, 4), 0.9, True)
    assert problem.backbone == str(tmp_path.resolve())  # outside the repository: stored absolute
    assert problems_from_args(parser.parse_args([])) == [PruningProblem(data_dir=problem.data_dir)]
    (inside,) = problems_from_args(parser.parse_args(["--backbone", str(REFERENCE_BACKBONE)]))
    assert inside.backbone == "reference/vit_tiny_cifar10"  # inside: stored relative to the repository


def test_a_backbone_path_is_relative_to_the_working_directory_even_when_it_reads_as_the_default(tmp_path, monkeypatch):
    """``--backbone reference/vit_tiny_cifar10`` run from another checkout names that checkout's backbone, not
    this repository's."""
    parser = argparse.ArgumentParser()
    add_problem_arguments(parser, "pruning problem")
    monkeypatch.chdir(tmp_path)
    (problem,) = problems_from_args(parser.parse_args(["--backbone", "reference/vit_tiny_cifar10"]))
    assert problem.backbone == str(tmp_path.resolve() / "reference" / "vit_tiny_cifar10")


def test_number_settings_given_several_values_sweep_their_combinations():
    parser = argparse.ArgumentParser()
    add_problem_arguments(parser, "pruning problem")
    problems = problems_from_args(parser.parse_args(["--target-ratio", "0.3,0.5", "--lr", "1e-4,3e-4",
                                                     "--prune-points", "2,4", "--hidden", "32",
                                                     "--train-ratios", "0.1,0.35"]))
    assert [(p.target_ratio, p.ppo.lr) for p in problems] == [(0.3, 1e-4), (0.3, 3e-4), (0.5, 1e-4), (0.5, 3e-4)]
    # a list of pruning points or of training ratios is one value, not a sweep
    assert {(p.prune_points, p.hidden, p.train_ratios) for p in problems} == {((2, 4), 32, (0.1, 0.35))}
    assert [sweep_label(p, problems) for p in problems] == ["target_ratio=0.3,lr=0.0001", "target_ratio=0.3,lr=0.0003",
                                                            "target_ratio=0.5,lr=0.0001", "target_ratio=0.5,lr=0.0003"]
    assert sweep_label(problems[0], problems[:1]) == "target_ratio=0.3"
    for bad in (["--target-ratio", "0.3,half"], ["--train-ratios", "0.1,some"]):
        with pytest.raises(SystemExit):
            parser.parse_args(bad)
