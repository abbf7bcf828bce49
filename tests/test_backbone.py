"""backbone.py: a tiny model trains a few steps, exports, and reloads with the same logits."""

import json
import logging
import math
import os
import re
import shutil
import signal
import sys
import time
import warnings
from pathlib import Path

import huggingface_hub
import numpy as np
import pytest
import torch

import backbone
from backbone_training import model_geometry, splits, time_budget, training_state, training_step
from backbone_training.training_state import STATE_FILE
from cli import code_commit, versions_line
from envs.errors import UsageError
from envs.vit import backbone_checkpoint
from envs.vit.backbone_checkpoint import CheckpointError, create_vit, load_backbone, normalize, save_backbone
from envs.vit.data import load_split
from tests.host_reads import host_round_trips

TINY = ["img_size=32", "patch_size=4", "depth=2", "embed_dim=48", "num_heads=3"]


def run_backbone(tmp_path, data_dir, *extra, limit: int = 256):
    """backbone.py's exit code for the tiny model on ``limit`` images, one epoch unless ``extra`` says otherwise."""
    return backbone.main(["--data-dir", str(data_dir), "--output-dir", str(tmp_path / "run"), "--limit", str(limit),
                          "--batch-size", "64", "--epochs", "1", "--warmup-epochs", "0", "--no-download",
                          "--model-kwargs", *TINY, *extra])


def test_train_compiled_export_and_reload_same_logits(tmp_path, data_dir, monkeypatch):
    """With --compile the model trains through torch.compile's wrapper, whose state dict prefixes every key
    with ``_orig_mod.``; the saved state and the export are the model's own. Dynamo traces the model here, but
    Inductor does not generate code (45 s on a 2-core CPU): the eager backend runs the traced graph."""
    compile_eagerly, compiled = torch.compile, []

    def compile_recorded(model):
        compiled.append(compile_eagerly(model, backend="eager"))
        return compiled[-1]

    monkeypatch.setattr(torch, "compile", compile_recorded)
    forwards = []  # the modules each training forward ran through
    optimize = training_step.TrainingStep.optimize

    def recorded(self, x, y):
        forwards.append(self.model)
        return optimize(self, x, y)

    monkeypatch.setattr(training_step.TrainingStep, "optimize", recorded)
    scored, score = [], training_step.accuracy
    monkeypatch.setattr(backbone, "accuracy", lambda model, split, *args, **kwargs: scored.append(split)
                        or score(model, split, *args, **kwargs))
    assert run_backbone(tmp_path, data_dir, "--full-precision", "--compile") == 0
    torch._dynamo.reset()
    assert len(compiled) == 1 and forwards and all(module is compiled[0] for module in forwards)
    export = tmp_path / "run" / "backbone"
    config = json.loads((export / "config.json").read_text())
    assert config["split_sizes"] == {"train": 256, "val": 256, "test": 256} and config["recipe"]["compiled"]
    # the epochs validated on the held-out images the config records, those train.py and evaluate.py hold out
    recorded_val = load_split("cifar10", "val", data_dir, input_size=32, val_size=256, seed=config["split_seed"])
    assert torch.equal(scored[0].images, recorded_val.images)
    assert config["class_names"][0] == "airplane" and 0.0 <= config["test_accuracy"] <= 1.0
    assert config["commit"] == code_commit() and config["versions"] == versions_line()  # what made it
    state = torch.load(tmp_path / "run" / "train_state.pt", weights_only=False)
    trained, _ = load_backbone(export)
    reference = backbone.create_vit(config["model_name"], 10, config["model_kwargs"])
    reference.load_state_dict(state["model"])
    x = normalize(torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8), config)
    assert torch.equal(trained(x), reference.eval()(x))


def test_refuses_existing_run_and_resumes(tmp_path, data_dir, capsys):
    """A run stopped after its first epoch and resumed ends where an uninterrupted run ends, weights and random
    streams alike: the augmentation generator, torch's (stochastic depth) and numpy's (mixup) are saved and
    restored. In bf16 autocast, as backbone.py trains on a GPU by default."""
    drop_path = "drop_path_rate=0.1"  # one more model kwarg: stochastic depth draws from torch's generator
    assert run_backbone(tmp_path, data_dir, drop_path, "--epochs", "2", "--time-limit", "0", "--amp") == 0
    # the command that goes on gives again the flags a resumed run takes from its command line, not its record
    go_on = (f"time limit reached after epoch 1; continue with python backbone.py --output-dir {tmp_path / 'run'} "
             f"--resume --time-limit 0 --no-download --data-dir {data_dir} --epochs 2\n")
    out = capsys.readouterr().out
    assert go_on in out
    assert (f"data: cifar10 in {data_dir}: 10 classes (airplane, automobile, bird, cat, deer, dog, frog, horse, ship, "
            f"truck); 256 training and 256 validation images\n") in out  # what the user's data turned out to be
    assert run_backbone(tmp_path, data_dir, drop_path, "--epochs", "2", "--amp") == 2
    assert "--resume" in capsys.readouterr().err
    assert backbone.main(["--output-dir", str(tmp_path / "run"), "--resume", "--data-dir", str(data_dir)]) == 0
    config = json.loads((tmp_path / "run" / "backbone" / "config.json").read_text())
    assert capsys.readouterr().out.endswith(  # the test reading, as the epochs' lines read validation
        f"reading the test split once, for the model card\ntest {100 * config['test_accuracy']:.2f}% on 256 images, "
        f"{config['gflops']:g} GFLOPs a forward: exported to {tmp_path / 'run' / 'backbone'}\n")
    assert run_backbone(tmp_path / "uninterrupted", data_dir, drop_path, "--epochs", "2", "--amp") == 0
    resumed, uninterrupted = (torch.load(path / "run" / STATE_FILE, weights_only=False)
                              for path in (tmp_path, tmp_path / "uninterrupted"))
    assert resumed["epoch"] == uninterrupted["epoch"] == 2
    assert torch.equal(resumed["generator"], uninterrupted["generator"])
    assert all(torch.equal(resumed["model"][key], value) for key, value in uninterrupted["model"].items())
    # a finished run is not trained or read again, nor shortened below what it trained
    capsys.readouterr()
    for epochs in ([], ["--epochs", "1"]):
        assert backbone.main(["--output-dir", str(tmp_path / "run"), "--resume", *epochs]) == 2
        assert capsys.readouterr().err == ("error: --resume: the run has trained 2 epochs and read the test split: "
                                           "pass --epochs more than 2 to lengthen it\n")
    # a resumed run may extend its schedule; the card records the change
    assert backbone.main(["--output-dir", str(tmp_path / "run"), "--resume", "--epochs", "3"]) == 0
    config = json.loads((tmp_path / "run" / "backbone" / "config.json").read_text())
    assert [h["epoch"] for h in config["history"]] == [1, 2, 3]
    assert config["recipe"]["schedule_changes"] == [{"at_epoch": 2, "epochs": 3}]
    # every finished run read the test split; the card says so instead of claiming a single reading
    assert [r["epoch"] for r in config["test_readings"]] == [2, 3]
    card = (tmp_path / "run" / "backbone" / "MODEL_CARD.md").read_text()
    assert "read only when a run finished: after epoch 2" in card and "read once" not in card


@pytest.mark.parametrize("epochs", ["2", "50"])  # extended, shortened
def test_a_time_budget_sets_the_schedule_length_from_the_second_epoch(epochs, tmp_path, data_dir, monkeypatch,
                                                                       capsys):
    """--time-budget replaces --epochs after the second epoch (the first pays for compiling) with the epochs
    that fit, a reserve kept for the test reading and the export; the cosine schedule and the card follow."""
    assert time_budget.epochs_within(600, 10, 2, compiled=True) == 2 + (600 - 60 - 20) // 10
    assert time_budget.epochs_within(600, 10, 2, compiled=False) == 2 + (600 - 20) // 10  # no compiling to wait for
    assert time_budget.epochs_within(30, 10, 2, compiled=True) == 2  # no time left: the run ends with the epochs done
    fitted = []

    def fit(seconds_left, epoch_seconds, epochs_done, compiled):
        fitted.append((seconds_left, epoch_seconds, epochs_done, compiled))
        return 3

    monkeypatch.setattr(time_budget, "epochs_within", fit)
    rates = []  # the learning rate each update runs at
    optimize = training_step.TrainingStep.optimize

    def recorded(self, x, y):
        rates.append(self.optimizer.param_groups[0]["lr"])
        return optimize(self, x, y)

    monkeypatch.setattr(training_step.TrainingStep, "optimize", recorded)
    assert run_backbone(tmp_path, data_dir, "--epochs", epochs, "--time-budget", "1000") == 0
    assert len(fitted) == 1 and fitted[0][2:] == (2, False) and 0 < fitted[0][1] < fitted[0][0] < 1000
    # 256 images in batches of 64: 4 updates an epoch. The third epoch's updates (t = 9 to 11; update 9 runs at
    # the rate set before the change) follow the cosine of 3 epochs, 12 updates, that the scheduler now runs
    peak = 3e-3 * 64 / 512
    cosine = [peak / 100 + (peak - peak / 100) / 2 * (1 + math.cos(math.pi * t / 12)) for t in (9, 10, 11)]
    assert len(rates) == 12 and rates[-3:] == pytest.approx(cosine)
    assert "--time-budget 1000 s: 3 epochs in all" in capsys.readouterr().out
    config = json.loads((tmp_path / "run" / "backbone" / "config.json").read_text())
    assert [h["epoch"] for h in config["history"]] == [1, 2, 3] and config["recipe"]["epochs"] == 3
    assert config["recipe"]["schedule_changes"] == [{"at_epoch": 2, "epochs": 3, "by": "--time-budget"}]
    assert "re-set to 3 epochs to fit --time-budget" in (tmp_path / "run" / "backbone" / "MODEL_CARD.md").read_text()


def test_a_time_budget_applies_where_one_epoch_is_scheduled(tmp_path, data_dir, monkeypatch, capsys):
    """With one epoch scheduled (--epochs 1, or a --resume one epoch short of its end) no second epoch comes to
    measure: the first epoch's time sets the schedule's length (the budget was ignored), and the second's sets it
    again if the first planned one."""
    fitted, planned = [], {"epochs": 2}  # the epochs_done of each plan; what each plan returns

    def fit(seconds_left, epoch_seconds, epochs_done, compiled):
        fitted.append(epochs_done)
        return max(epochs_done, planned["epochs"])

    monkeypatch.setattr(time_budget, "epochs_within", fit)
    assert run_backbone(tmp_path, data_dir, "--time-budget", "1000") == 0  # --epochs 1
    assert fitted == [1, 2] and "--time-budget 1000 s: 2 epochs in all, from epoch 1's" in capsys.readouterr().out
    config = json.loads((tmp_path / "run" / "backbone" / "config.json").read_text())
    assert [h["epoch"] for h in config["history"]] == [1, 2] and config["recipe"]["epochs"] == 2
    assert config["recipe"]["schedule_changes"] == [{"at_epoch": 1, "epochs": 2, "by": "--time-budget"}]
    fitted.clear()
    stopped = tmp_path / "stopped"  # stopped after its first of two epochs: one is left
    assert run_backbone(stopped, data_dir, "--epochs", "2", "--time-limit", "0") == 0
    assert fitted == []
    planned["epochs"] = 3
    assert backbone.main(["--output-dir", str(stopped / "run"), "--resume", "--time-budget", "1000"]) == 0
    assert fitted == [2, 3]
    config = json.loads((stopped / "run" / "backbone" / "config.json").read_text())
    assert [h["epoch"] for h in config["history"]] == [1, 2, 3]
    assert config["recipe"]["schedule_changes"] == [{"at_epoch": 2, "epochs": 3, "by": "--time-budget"}]


def test_bf16_autocast_is_a_gpus_default_and_a_resumed_run_keeps_what_it_recorded(tmp_path, data_dir, capsys):
    """bf16 autocast by default on a GPU only: emulated on a CPU without native bf16, it made an epoch 20 times as
    long. A run records what it resolved, and a resumed run goes on so on any device, a run recorded before
    --amp existed (``no_amp``: autocast unless it was given) included."""
    resolve_amp = training_step.resolve_amp
    assert resolve_amp(None, torch.device("cuda")) and not resolve_amp(None, torch.device("cpu"))
    assert resolve_amp(True, torch.device("cpu")) and not resolve_amp(False, torch.device("cuda"))

    def recipe_amp() -> str:
        return json.loads((tmp_path / "run" / "backbone" / "config.json").read_text())["recipe"]["amp"]

    assert run_backbone(tmp_path, data_dir, "--epochs", "2", "--time-limit", "0", "--device", "cpu") == 0
    state_path = tmp_path / "run" / STATE_FILE
    state = torch.load(state_path, weights_only=False)
    assert state["args"]["amp"] is False
    del state["args"]["amp"]
    torch.save({**state, "args": {**state["args"], "no_amp": False}}, state_path)  # as written before --amp
    assert backbone.main(["--output-dir", str(tmp_path / "run"), "--resume"]) == 0
    assert recipe_amp() == "bf16 autocast"
    assert backbone.main(["--output-dir", str(tmp_path / "run"), "--resume", "--epochs", "3", "--no-amp"]) == 2
    assert "--resume continues the run it recorded (--amp): --no-amp cannot change it" in capsys.readouterr().err
    assert backbone.main(["--output-dir", str(tmp_path / "run"), "--resume", "--epochs", "3", "--amp"]) == 0
    assert recipe_amp() == "bf16 autocast"


def test_a_time_budget_counts_the_time_spent_reading_the_data(tmp_path, data_dir, monkeypatch):
    """--time-budget is the whole run's: the seconds spent decoding the splits before the first epoch (about 20
    s for CIFAR-10) are spent from it too."""
    fitted, load_split = [], splits.load_split

    def slow_load_split(*args, **kwargs):
        time.sleep(1.0)
        return load_split(*args, **kwargs)

    monkeypatch.setattr(splits, "load_split", slow_load_split)
    monkeypatch.setattr(time_budget, "epochs_within", lambda left, seconds, done, compiled: fitted.append(left) or done)
    assert run_backbone(tmp_path, data_dir, "--epochs", "3", "--time-budget", "1000") == 0
    config = json.loads((tmp_path / "run" / "backbone" / "config.json").read_text())
    trained = config["history"][1]["seconds"]  # the two epochs before the budget is read
    assert len(fitted) == 1 and 1000 - fitted[0] >= trained + 2  # and the train and val splits' reading


def test_the_training_state_is_saved_every_few_epochs_and_at_the_end(tmp_path, data_dir, monkeypatch):
    saved = []
    save = training_state.save_state
    monkeypatch.setattr(backbone, "save_state", lambda path, state: (saved.append(state["epoch"]), save(path, state)))
    assert run_backbone(tmp_path, data_dir, "--epochs", "5", "--save-every", "2", limit=64) == 0
    assert saved == [2, 4, 5]  # epoch 5's with the test reading
    saved.clear()
    assert run_backbone(tmp_path / "stopped", data_dir, "--epochs", "5", "--save-every", "2", "--time-limit", "0",
                        limit=64) == 0
    assert saved == [1]  # a --time-limit stop saves what it would lose


def test_a_saved_augmentation_stream_of_another_device_restarts_from_a_seed(capsys):
    """States saved before the augmentation moved to the device hold a CPU stream (and no device): a CPU run
    continues it; a run on another kind of device cannot, and says that it draws a new stream."""
    generator = torch.Generator()
    saved = torch.Generator().manual_seed(5)
    training_state.restore_generator(generator, {"generator": saved.get_state()}, reseed=3)
    assert torch.equal(generator.get_state(), saved.get_state()) and capsys.readouterr().out == ""
    training_state.restore_generator(generator, {"generator": torch.zeros(16, dtype=torch.uint8),
                                                 "generator_device": "cuda"}, reseed=3)
    assert torch.equal(generator.get_state(), torch.Generator().manual_seed(3).get_state())
    assert "drawn on cuda; on cpu the rest of the run draws a new one (seed 3)" in capsys.readouterr().out


def test_a_training_epoch_neither_waits_for_the_device_nor_copies_from_the_host(monkeypatch):
    """training_step.run_epoch with the reference recipe (crop/flip, RandAugment, mixup/cutmix, fused AdamW,
    clipping, the scheduler, bf16 autocast, the loss summed) on a tiny model. The first epoch builds what is built
    once (AdamW's state, normalize's mean and std on the device); in the second, nothing may cross between host
    and device."""
    args = backbone.build_parser().parse_args(["--model-kwargs", *TINY, "--batch-size", "16", "--device", "cpu",
                                               "--amp"])
    args.epochs = 2
    model = create_vit(args.model, 10, model_geometry.parse_kwargs(args.model_kwargs)).train()
    step = training_step.build_training_step(args, model, 10, 3, {"mean": [0.5] * 3, "std": [0.25] * 3},
                                             torch.device("cpu"))
    images = torch.randint(0, 256, (48, 3, 32, 32), dtype=torch.uint8)
    labels = torch.randint(0, 10, (48,))
    np.random.seed(1)  # timm's draws: the second epoch mixes up its first batch and cuts the other two
    training_step.run_epoch(step, images, labels, 16, 3, 0)
    with host_round_trips(monkeypatch) as calls:
        training_step.run_epoch(step, images, labels, 16, 3, 3)
    assert calls == []


def test_a_one_step_schedule_prints_no_bare_timm_line(caplog):
    """A schedule of one step (``--epochs 1`` on a split of one batch, a smoke test) makes timm's cosine scheduler
    log that it has no effect, a bare line outside the commands' ``warning: ...`` form: the step builds it
    without that line."""
    args = backbone.build_parser().parse_args(["--model-kwargs", *TINY, "--epochs", "1", "--warmup-epochs", "0",
                                               "--device", "cpu"])
    model = create_vit(args.model, 10, model_geometry.parse_kwargs(args.model_kwargs)).train()
    with caplog.at_level(logging.WARNING):
        step = training_step.build_training_step(args, model, 10, 1, {"mean": [0.5] * 3, "std": [0.25] * 3},
                                                 torch.device("cpu"))
    assert step.scheduler.t_initial == 1
    assert [record.getMessage() for record in caplog.records if record.name.startswith("timm")] == []


def test_a_class_the_validation_split_takes_whole_is_named(tmp_path):
    """The validation split is drawn across the classes, so a rare class may go to it whole: the backbone would
    then train without the class, unless told."""
    from PIL import Image

    for split, counts in (("train", {"ant": 6, "bee": 1, "cat": 6}), ("test", {"ant": 1, "bee": 1, "cat": 1})):
        for name, count in counts.items():
            (tmp_path / split / name).mkdir(parents=True)
            for i in range(count):
                Image.new("RGB", (32, 32), (30 * i, 90, 0)).save(tmp_path / split / name / f"{i}.png")
    labels = np.array([0] * 6 + [1] + [2] * 6)  # the bee is image 6 of the training split
    val_size = int(np.flatnonzero(np.argsort(labels, kind="stable")[np.random.default_rng(0).permutation(13)] == 6)[0]
                   ) + 1  # the least that holds it out
    flags = ["--dataset", "folder", "--data-dir", str(tmp_path), "--model-kwargs", *TINY]
    args = backbone.build_parser().parse_args([*flags, "--val-size", str(val_size)])
    message = (r"^no training image of class 'bee': all its images are in the validation split, so the backbone will "
               r"not learn it \(a smaller --val-size keeps some\)$")
    with pytest.warns(UserWarning, match=message):
        splits.training_data(args, 32, torch.device("cpu"))
    if val_size > 1:
        with warnings.catch_warnings():
            warnings.simplefilter("error", UserWarning)
            splits.training_data(backbone.build_parser().parse_args([*flags, "--val-size", str(val_size - 1)]), 32,
                                 torch.device("cpu"))


def test_half_precision_export_round_trips(tmp_path, tiny_backbone):
    model, config = load_backbone(tiny_backbone)
    save_backbone(model, config, tmp_path / "half", half=True)
    reloaded, reloaded_config = load_backbone(tmp_path / "half")
    assert reloaded_config["weights_dtype"] == "float16"
    expected = model.half().float()
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(reloaded(x), expected(x))


def test_bad_checkpoints_and_models_fail_clearly(tmp_path, tiny_backbone, capsys):
    truncated = Path(shutil.copytree(tiny_backbone, tmp_path / "truncated"))
    weights = truncated / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:5000])
    with pytest.raises(CheckpointError, match="cannot read weights in"):
        load_backbone(truncated)
    with pytest.raises(CheckpointError, match="not a backbone checkpoint") as refused:
        load_backbone(tmp_path)
    assert "wrote its checkpoint" not in str(refused.value)
    run = tmp_path / "run"  # backbone.py's --output-dir: its checkpoint is one level down
    shutil.copytree(tiny_backbone, run / "backbone")
    with pytest.raises(CheckpointError, match=f"backbone.py's run there wrote its checkpoint to {run / 'backbone'}$"):
        load_backbone(run)
    with pytest.raises(CheckpointError, match="backbone checkpoint .*nowhere does not exist"):
        load_backbone(tmp_path / "nowhere")
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_backbone(tmp_path)
    edited = Path(shutil.copytree(tiny_backbone, tmp_path / "edited"))  # a config edited by hand
    config = json.loads((edited / "config.json").read_text())
    for change, message in (({"input_size": "abc"}, "input_size must be a positive integer (pixels)"),
                            ({"mean": [0.5]}, "mean must be 3 numbers, one per colour channel"),
                            ({"std": [0.2, 0.0, 0.2], "num_classes": True},
                             "num_classes must be a positive integer; std must be 3 positive numbers"),
                            ({"class_names": ["ant"]}, "class_names must name each of the num_classes classes")):
        (edited / "config.json").write_text(json.dumps({**config, **change}))
        with pytest.raises(CheckpointError, match=rf"^{edited / 'config.json'}: {re.escape(message)}"):
            load_backbone(edited)
    assert backbone.main(["--model", "vit_nonexistent", "--output-dir", str(tmp_path / "x")]) == 2
    capsys.readouterr()
    assert backbone.main(["--epochs", "many", "--output-dir", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: argument --epochs") and err.count("\n") == 1


@pytest.mark.parametrize(("flags", "message"), [
    (["--epochs", "0"], "argument --epochs: must be at least 1, got 0"),
    (["--batch-size", "0"], "argument --batch-size: must be at least 1, got 0"),
    (["--mixup", "-1"], "argument --mixup: must be a finite number >= 0, got -1"),
    (["--randaug-magnitude", "31"], "argument --randaug-magnitude: must be at most 30 (torchvision's bins), got 31"),
    (["--label-smoothing", "2"], "--label-smoothing must be in [0, 1), got 2.0"),
    (["--randaug", "0", "--randaug-magnitude", "9"], "--randaug-magnitude: --randaug 0 builds no RandAugment"),
    (["--seed", str(2**32)], "argument --seed: must be at most 4294967295, got 4294967296"),
    (["--split-seed", str(2**32)], "argument --split-seed: must be at most 4294967295, got 4294967296"),
    (["--device", "gpu"], "--device 'gpu' is not a torch device"),
    (["--model-kwargs", "img_size=32", "bogus_kw=1"], "timm cannot build vit_tiny_patch16_224 with"),
    (["--model-kwargs", "embed_dim=30", "num_heads=4"], "timm cannot build vit_tiny_patch16_224 with"),
    # built by timm, but with DropPath keep probabilities below 0 that bernoulli_ refuses at the first training step
    (["--model-kwargs", "img_size=32", "patch_size=4", "drop_path_rate=1.5"],
     "error: --model vit_tiny_patch16_224 --model-kwargs img_size=32 patch_size=4 drop_path_rate=1.5: timm's model "
     "fails to train with them: bernoulli_ expects p to be in [0, 1], but got p=-"),
    # timm's constructors fail on them with a RuntimeError, a KeyError and a ZeroDivisionError
    (["--model-kwargs", "img_size=32", "mlp_ratio=-1"], "--model-kwargs img_size=32 mlp_ratio=-1: timm cannot build "
                                                        "vit_tiny_patch16_224 with"),
    (["--model-kwargs", "img_size=32", "act_layer=foo"], "'act_layer': 'foo'}: KeyError 'foo'"),
    # Python's own words for timm's ``dim % num_heads``: "integer division or modulo by zero" before 3.11
    (["--model-kwargs", "img_size=32", "num_heads=0"],
     f"'num_heads': 0}}: integer {'' if sys.version_info >= (3, 11) else 'division or '}modulo by zero"),
    (["--model-kwargs", "img_size=(32, 48)", "patch_size=4"], "the data pipeline feeds square images"),
    (["--model-kwargs", "img_size=32", "in_chans=1"], "in_chans=1: the data pipeline feeds RGB images (a grey image "
                                                      "converted), so the model takes 3 channels"),
    (["--model-kwargs", "img_size=32", "num_classes=5"], "model kwarg 'num_classes' is set from the data set's "
                                                         "classes: leave it out of --model-kwargs"),
    (["--model-kwargs", "pretrained=True"], "model kwarg 'pretrained' is set from --pretrained: leave it out"),
    (["--model-kwargs", "img_size=32", "patch_size=4", "global_pool=map"],
     "StagedViT supports global_pool 'token' or 'avg', got 'map'"),
    (["--model", "resnet18", "--model-kwargs"], "error: --model resnet18: StagedViT needs a plain timm "
                                                "VisionTransformer"),
    (["--model-kwargs", "img_size=32", "patch_size=4", "depth=1"], "a ViT of 1 block(s) has no pruning point"),
    (["--model-kwargs", "img_size=8", "patch_size=16"], "its patch grid is 0x0 (0 patch tokens): pruning needs two"),
    *[(["--model-kwargs", "img_size=30", "patch_size=8", *dynamic],
       "dynamic_img_pad pads its 30-px images to 4x4 patches of 8 px, not the 3x3 grid it is built for (and prunes)")
      for dynamic in (["dynamic_img_pad=True"], ["dynamic_img_pad=True", "dynamic_img_size=True"])],
    (["--output-dir", "a_file"], "a_file is a file, not a directory"),
])
def test_what_backbone_py_cannot_train_or_prune_is_one_line_before_it_trains(flags, message, tmp_path, monkeypatch,
                                                                              capsys):
    """Refused before any data is read or epoch run: a model train.py could not prune would otherwise be
    trained to the end first."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a_file").write_text("")
    assert backbone.main(["--data-dir", str(tmp_path / "no_data"), "--output-dir", "out", *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1, err
    assert not (tmp_path / "out").exists()


def test_output_dirs_starting_with_a_tilde_are_in_the_home_directory(tmp_path, monkeypatch, capsys):
    """As train.py's: a quoted ``~/...`` (no shell expanded it) names the home directory, not a ``./~``."""
    import evaluate

    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    assert evaluate.build_parser().parse_args(["--output-dir", "~/results"]).output_dir == tmp_path / "results"
    (tmp_path / "a_file").write_text("")
    assert backbone.main(["--output-dir", "~/a_file", "--data-dir", str(tmp_path)]) == 2
    assert f"{tmp_path / 'a_file'} is a file, not a directory" in capsys.readouterr().err
    assert not (tmp_path / "~").exists()


def test_an_exported_backbone_alone_is_not_replaced_without_overwrite(tmp_path, capsys):
    """A directory holding only an export (a finished run whose training state was removed, or a backbone copied
    there) is work as much as a run is; --resume and --overwrite together are refused, as train.py refuses them."""
    export = tmp_path / "run" / backbone.RUN_EXPORT_DIR
    export.mkdir(parents=True)
    (export / "config.json").write_text("{}")
    assert backbone.main(["--output-dir", str(tmp_path / "run"), "--data-dir", str(tmp_path)]) == 2
    assert capsys.readouterr().err == (f"error: {tmp_path / 'run'} already holds an exported backbone ({export}): "
                                       f"pass --overwrite to replace it, or start from it with --init-from {export} "
                                       f"in another --output-dir\n")
    assert (export / "config.json").read_text() == "{}"
    assert backbone.main(["--output-dir", str(tmp_path / "run"), "--resume", "--overwrite"]) == 2
    assert capsys.readouterr().err == "error: --resume continues a run; --overwrite replaces it: pass one of them\n"


def test_a_directory_holding_something_else_is_refused_and_an_export_names_its_run(tmp_path, capsys):
    """As train.py: an --output-dir with files but no backbone.py run in it (one's own files, a train.py run, a
    run's export) is never written into, with --overwrite too; an export given for its run is named."""
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    for flags in ([], ["--overwrite"]):
        assert backbone.main(["--output-dir", str(mine), "--data-dir", str(tmp_path), "--no-download", *flags]) == 2
        assert capsys.readouterr().err == f"error: {mine} is not empty and holds no backbone.py run: choose another " \
                                          f"--output-dir\n"
    assert [path.name for path in mine.iterdir()] == ["notes.txt"]
    run = tmp_path / "run"
    export = run / backbone.RUN_EXPORT_DIR
    export.mkdir(parents=True)
    (export / "config.json").write_text("{}")
    (run / STATE_FILE).write_bytes(b"")
    named = f"({export} is the export of the run in {run}: pass --output-dir {run})"
    assert backbone.main(["--output-dir", str(export), "--data-dir", str(tmp_path), "--no-download"]) == 2
    assert capsys.readouterr().err == f"error: {export} is not empty and holds no backbone.py run: choose another " \
                                      f"--output-dir {named}\n"
    assert backbone.main(["--output-dir", str(export), "--resume"]) == 2
    state = export / STATE_FILE
    assert capsys.readouterr().err == f"error: nothing to resume: {state} does not exist {named}\n"
    assert sorted(path.name for path in export.iterdir()) == ["config.json"]
    other = tmp_path / "other"
    (other / backbone.RUN_EXPORT_DIR).mkdir(parents=True)  # a backbone/ without a config is no export
    assert backbone.main(["--output-dir", str(other), "--no-download"]) == 2
    assert "holds no backbone.py run" in capsys.readouterr().err
    killed = tmp_path / "killed"  # a first save killed before it finished: only its staged file, a run to start
    killed.mkdir()
    (killed / f".{STATE_FILE}.tmp").write_bytes(b"")
    assert backbone.main(["--output-dir", str(killed), "--data-dir", str(tmp_path / "no_data"), "--no-download"]) == 2
    assert "data directory" in capsys.readouterr().err  # past the output directory's checks


def test_an_interrupt_or_a_damaged_state_is_one_line(tmp_path, monkeypatch, capsys):
    def interrupt(args, given):
        raise KeyboardInterrupt

    def terminate(args, given):  # kill, a job scheduler: as Ctrl-C
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(10)

    def not_taken(signum, frame):  # where backbone.py left SIGTERM to this handler, rather than end pytest
        raise AssertionError("SIGTERM reached the handler backbone.py found")

    run, handler = tmp_path / "my run", signal.signal(signal.SIGTERM, not_taken)
    try:
        for stop in (interrupt, terminate):
            monkeypatch.setattr(backbone, "train", stop)
            assert backbone.main(["--output-dir", str(run)]) == 130
            assert capsys.readouterr().err == "interrupted before an epoch was saved: run the command again\n"
        assert signal.getsignal(signal.SIGTERM) is not_taken  # given back
    finally:
        signal.signal(signal.SIGTERM, handler)
    run.mkdir()
    (run / STATE_FILE).write_bytes(b"")
    assert backbone.main(["--output-dir", str(run)]) == 130
    assert capsys.readouterr().err == f"interrupted: go on with python backbone.py --output-dir '{run}' --resume\n"
    # with the flags a resumed run takes from its command line, not its record: without them a --time-budget run
    # would go on for the default 185 epochs, on the default device, uncompiled; and the schedule's length, which
    # the state records only from its next save
    assert backbone.main(["--output-dir", str(run), "--time-budget", "20m", "--device", "cpu", "--compile",
                          "--memory-budget-mb", "0", "--save-every", "2", "--lr", "1e-3", "--epochs", "9"]) == 130
    assert capsys.readouterr().err == (f"interrupted: go on with python backbone.py --output-dir '{run}' --resume "
                                       f"--time-budget 1200 --save-every 2 --device cpu --compile "
                                       f"--memory-budget-mb 0 --epochs 9\n")
    monkeypatch.undo()
    for damage in (b"", b"garbage\n"):
        (run / STATE_FILE).write_bytes(damage)
        assert backbone.main(["--output-dir", str(run), "--resume"]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: cannot read {run / STATE_FILE} (") and err.count("\n") == 1, err


def test_a_resume_keeps_the_model_it_recorded(tmp_path, data_dir, capsys):
    run = ["--data-dir", str(data_dir), "--output-dir", str(tmp_path / "run"), "--limit", "64", "--val-size", "100",
           "--epochs", "2", "--batch-size", "32", "--lr", "1e-3", "--model-kwargs", "img_size=32", "patch_size=8",
           "depth=2", "embed_dim=16", "num_heads=2"]
    assert backbone.main([*run, "--time-limit", "0"]) == 0
    capsys.readouterr()
    resume = ["--output-dir", str(tmp_path / "run"), "--resume"]
    assert backbone.main([*resume, "--model-kwargs", "img_size=16"]) == 2
    assert "--model-kwargs cannot change it" in capsys.readouterr().err
    # the recipe is the recorded one: a flag of it given with another value is refused, not ignored
    # (--lr 0.003 is the default: a flag given with its default value is still given)
    assert backbone.main([*resume, "--lr", "0.003"]) == 2
    assert capsys.readouterr().err == ("error: --resume continues the run it recorded (--lr 0.001): --lr cannot "
                                       "change it (start a new run with --init-from its export instead)\n")
    assert backbone.main([*resume, "--full-precision"]) == 2
    assert "the run it recorded (--half): --full-precision cannot change it" in capsys.readouterr().err
    assert backbone.main([*resume, "--pretrained"]) == 2
    assert "the run it recorded (without --pretrained): --pretrained cannot change it" in capsys.readouterr().err
    assert backbone.main([*resume, "--limit", "32"]) == 2
    assert "the run it recorded (--limit 64): --limit cannot change it" in capsys.readouterr().err
    # where the data is comes from the command line when given: a run moved to another machine finds it there
    assert backbone.main([*resume, "--data-dir", str(tmp_path / "moved"), "--no-download"]) == 2
    assert str(tmp_path / "moved") in capsys.readouterr().err
    assert backbone.main([*resume, "--data-dir", str(data_dir), "--lr", "0.001"]) == 0  # the recorded lr, given


def test_a_resume_on_other_data_is_refused(tmp_path, image_folder_224, capsys):
    """A --data-dir given on resume is for a run moved to another machine: data of other classes or other
    validation images (which the run may have trained on) is refused before anything trains."""
    from PIL import Image

    run = ["--dataset", "folder", "--data-dir", str(image_folder_224), "--output-dir", str(tmp_path / "run"),
           "--val-size", "6", "--epochs", "2", "--batch-size", "8", "--model-kwargs", "img_size=32", "patch_size=8",
           "depth=2", "embed_dim=16", "num_heads=2"]
    assert backbone.main([*run, "--time-limit", "0"]) == 0  # stops after its first epoch
    renamed = Path(shutil.copytree(image_folder_224, tmp_path / "renamed"))
    for split in ("train", "test"):
        (renamed / split / "cat").rename(renamed / split / "cow")
    other = Path(shutil.copytree(image_folder_224, tmp_path / "other"))
    for path in sorted((other / "train").rglob("*.jpg")):
        Image.new("RGB", (224, 224), (len(path.stem) * 90 % 256, 200, 30)).save(path)
    capsys.readouterr()
    resume = ["--output-dir", str(tmp_path / "run"), "--resume", "--data-dir"]
    for data, changed in ((renamed, "class_names"), (other, "validation images")):
        assert backbone.main([*resume, str(data)]) == 2
        assert capsys.readouterr().err == (f"error: --resume: the data in {data} is not what the run trained on (its "
                                           f"{changed} differ): point --data-dir at a copy of that data set, or "
                                           f"start a new run\n")
    assert backbone.main([*resume, str(image_folder_224)]) == 0


def test_a_resume_finds_its_data_from_another_directory_and_names_data_that_moved(tmp_path, image_folder_224,
                                                                                   monkeypatch, capsys):
    """A relative --data-dir is recorded absolute, so a resume started elsewhere reads it; a data directory that
    has moved since is named with what to pass (the environment variable does not move a recorded run)."""
    work = tmp_path / "work"
    data = Path(shutil.copytree(image_folder_224, work / "data"))
    monkeypatch.chdir(work)
    assert backbone.main(["--dataset", "folder", "--data-dir", "data", "--output-dir", str(tmp_path / "run"),
                          "--val-size", "6", "--epochs", "2", "--batch-size", "8", "--time-limit", "0",
                          "--model-kwargs", "img_size=32", "patch_size=8", "depth=2", "embed_dim=16",
                          "num_heads=2"]) == 0  # stops after its first epoch
    monkeypatch.chdir(tmp_path)
    data.rename(work / "moved")
    capsys.readouterr()
    assert backbone.main(["--output-dir", str(tmp_path / "run"), "--resume"]) == 2
    assert capsys.readouterr().err == (f"error: --resume: the run's data directory {data} does not exist: pass "
                                       f"--data-dir where its data is now (the run reads the directory it recorded, "
                                       f"whatever MARL_PRUNING_DATA_DIR says)\n")
    (work / "moved").rename(data)
    assert backbone.main(["--output-dir", str(tmp_path / "run"), "--resume"]) == 0


def test_an_epoch_written_to_a_log_prints_its_progress(tmp_path, data_dir, monkeypatch, capsys):
    """Off a terminal (a log, where no progress bar shows) an epoch prints a line of its steps and loss once every
    PROGRESS_LINE_EVERY_S (60 s: a CPU epoch takes minutes); here every step."""
    monkeypatch.setattr(training_step, "PROGRESS_LINE_EVERY_S", 0.0)
    assert run_backbone(tmp_path, data_dir) == 0
    out = capsys.readouterr().out
    assert re.findall(r"^epoch 1/1: step (\d)/4, loss \d\.\d{4}$", out, re.MULTILINE) == ["1", "2", "3", "4"]


@pytest.mark.parametrize("epochs, fitted, recipe", [
    (5, "the 2 epochs that fit", "Recipe: 2 epochs; the run ended after epoch 2 to fit --time-budget,"),
    (1, "the 1 epoch that fits", "Recipe: 1 epochs, batch")])
def test_a_time_budget_that_leaves_the_run_within_its_warm_up_is_warned_of(tmp_path, data_dir, monkeypatch, capsys,
                                                                          epochs, fitted, recipe):
    """A --time-budget too short to leave the warm-up (a number is seconds here, minutes for train.py) says so,
    with the units, whether the budget shortened the schedule (--epochs 5) or fits the epochs already scheduled
    (--epochs 1, measured on its only epoch); the card records the schedule the run had, not one re-set from an
    epoch that never ran."""
    monkeypatch.setattr(time_budget, "epochs_within", lambda left, seconds, done, compiled: done)  # no time left
    assert backbone.main(["--data-dir", str(data_dir), "--output-dir", str(tmp_path / "run"), "--limit", "64",
                          "--batch-size", "32", "--epochs", str(epochs), "--time-budget", "20", "--no-download",
                          "--model-kwargs", *TINY]) == 0
    assert (f"warning: --warmup-epochs 10 is not fewer than {fitted} in --time-budget 20 s: the learning rate "
            "never leaves its warm-up (pass a shorter --warmup-epochs, or a longer --time-budget: 20m, 1.5h)\n"
            ) in capsys.readouterr().err
    assert recipe in (tmp_path / "run" / "backbone" / "MODEL_CARD.md").read_text()


def test_a_warm_up_as_long_as_the_run_is_warned_of(tmp_path, data_dir, capsys):
    """The default ten warm-up epochs swallow a short run: its learning rate would never peak nor decay. A
    --resume that changes the schedule's length to such a one says so too."""
    assert backbone.main(["--data-dir", str(data_dir), "--output-dir", str(tmp_path / "run"), "--limit", "64",
                          "--batch-size", "32", "--epochs", "1", "--no-download", "--model-kwargs", *TINY]) == 0
    assert ("warning: --warmup-epochs 10 is not fewer than --epochs 1: the learning rate never leaves its warm-up "
            "(pass a shorter --warmup-epochs)\n") in capsys.readouterr().err
    assert backbone.main(["--output-dir", str(tmp_path / "run"), "--resume", "--epochs", "2"]) == 0
    assert ("warning: --warmup-epochs 10 is not fewer than --epochs 2: the learning rate never leaves its warm-up "
            "(pass a shorter --warmup-epochs)\n") in capsys.readouterr().err


def test_mixup_gets_even_batches(tmp_path, image_folder_224, monkeypatch, capsys):
    """timm's mixup pairs the images of a batch: an odd --batch-size is refused in one line, and a training split
    smaller than a batch and odd (19 images here) trains in one batch of 18, the batch size that the learning
    rate is scaled for and the recipe records, with a note that it is not the one asked for."""
    run = ["--dataset", "folder", "--data-dir", str(image_folder_224), "--output-dir", str(tmp_path / "run"),
           "--val-size", "5", "--epochs", "1", "--model-kwargs", "img_size=32", "patch_size=8", "depth=2",
           "embed_dim=16", "num_heads=2"]
    assert backbone.main([*run, "--batch-size", "25"]) == 2
    assert "--batch-size 25: timm's mixup and cutmix pair each image" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
    built, build = [], training_step.build_training_step
    monkeypatch.setattr(backbone, "build_training_step", lambda *args: built.append(build(*args)) or built[-1])
    assert backbone.main(run) == 0
    assert ("note: --batch-size 256 is more than the 19 training images: steps of 18 images, the learning rate "
            "scaled for them\n") in capsys.readouterr().err
    assert built[0].scheduler.base_values == pytest.approx([3e-3 * 18 / 512] * len(built[0].scheduler.base_values))
    config = json.loads((tmp_path / "run" / "backbone" / "config.json").read_text())
    assert config["recipe"]["batch_size"] == 18


def test_step_benchmark_times_every_part(tmp_path):
    import benchmarks.backbone_step as step_benchmark

    out = tmp_path / "steps.json"
    assert step_benchmark.main(["--model-kwargs", *TINY, "--batch-size", "16", "--steps", "2", "--warmup", "1",
                                "--output", str(out)]) == 0
    table = json.loads(out.read_text())["rows"]
    rows = {row["part"]: row["ms_per_step"] for row in table}
    parts = ["crop + flip", "RandAugment", "normalize + mixup/cutmix", "forward + backward + AdamW"]
    assert list(rows) == [*parts, "sum of the parts", "training loop (no sync inside)"]
    assert all(ms > 0 for ms in rows.values())
    assert rows["sum of the parts"] == pytest.approx(sum(rows[part] for part in parts), abs=0.01)
    for row in table:  # seconds for an epoch of 45,000 images at 16 a step
        assert row["epoch_s"] == pytest.approx(row["ms_per_step"] / 1000 * 45000 / 16, abs=0.01)
    with pytest.raises(UsageError, match=r"^--data-dir, --half/--full-precision: a training step on random images"):
        step_benchmark.main(["--data-dir", "x", "--full-precision"])  # backbone.py's flags it would ignore
    with pytest.raises(UsageError, match="--steps: must be at least 1, got 0"):  # no step to time
        step_benchmark.main(["--steps", "0"])
    # the recipe's numbers that change no step's work: the time is the same whatever they are
    with pytest.raises(UsageError, match=r"^--epochs, --label-smoothing, --lr, --warmup-epochs: a training step on "
                                         r"random images does not use them, or takes as long whatever they are"):
        step_benchmark.main(["--model-kwargs", *TINY, "--batch-size", "16", "--steps", "1", "--warmup", "0",
                             "--epochs", "3", "--lr", "1e-3", "--warmup-epochs", "0", "--label-smoothing", "0"])
    # backbone.py's own checks, before a step is built (an odd batch was timm's AssertionError)
    with pytest.raises(UsageError, match="--batch-size 3: timm's mixup and cutmix pair each image"):
        step_benchmark.main(["--batch-size", "3"])
    with pytest.raises(UsageError, match="--randaug-magnitude: --randaug 0 builds no RandAugment"):
        step_benchmark.main(["--model-kwargs", *TINY, "--batch-size", "16", "--steps", "1", "--warmup", "0",
                             "--randaug", "0", "--randaug-magnitude", "5"])
    with pytest.raises(UsageError, match=r"--lr: must be a finite number > 0, got -1"):
        step_benchmark.main(["--lr", "-1"])


def test_the_input_size_is_the_models_own_unless_img_size_is_given():
    """backbone.py and backbone_step build their images at it (backbone_step took 224 for a 384-px model)."""
    assert model_geometry.square_input_size(create_vit("vit_tiny_patch16_384", 10, {}), {}) == 384
    model = create_vit("vit_tiny_patch16_224", 10, {"img_size": 32, "patch_size": 4})
    assert model_geometry.square_input_size(model, {"img_size": 32, "patch_size": 4}) == 32
    with pytest.raises(UsageError, match="the data pipeline feeds square images"):
        model_geometry.square_input_size(model, {"img_size": (32, 48)})


def test_a_streamed_split_trains_and_a_test_split_of_other_classes_is_refused(tmp_path, image_folder_224, capsys):
    """A split over the memory budget is read from its files during training, in the same batches of the same
    pixels as a decoded one. A test split that lacks a class (its labels would name other classes) is one error
    line before anything trains."""
    from envs.vit import data
    from envs.vit.data import load_split

    decoded, streamed = (load_split("folder", "train", image_folder_224, input_size=224, val_size=6,
                                    memory_budget_mb=budget).images for budget in (None, 0))
    order = torch.randperm(18)
    pairs = zip(training_step.epoch_batches(decoded, order, 4, 4), training_step.epoch_batches(streamed, order, 4, 4),
                strict=True)
    assert all(torch.equal(a, c) and torch.equal(b, d) for (a, b), (c, d) in pairs)

    folder = tmp_path / "data"
    shutil.copytree(image_folder_224, folder)

    def run(name, *extra):
        return backbone.main(["--dataset", "folder", "--data-dir", str(folder), "--output-dir", str(tmp_path / name),
                              "--val-size", "6", "--batch-size", "6", "--epochs", "1", "--warmup-epochs", "0",
                              "--model-kwargs", "img_size=224", "patch_size=56", "depth=2", "embed_dim=16",
                              "num_heads=2", *extra])

    assert run("streamed", "--memory-budget-mb", "0") == 0
    capsys.readouterr()
    shutil.move(folder / "test" / "ant", tmp_path / "ant")
    data._shared_raw_split.cache_clear()  # this process read the folder before the class went
    assert run("short") == 2
    err = capsys.readouterr().err
    assert err == ("error: the training split has class 'ant' that the test split lacks: the training and test "
                   "splits must hold the same classes\n")
    assert not (tmp_path / "short" / STATE_FILE).exists()
    shutil.move(tmp_path / "ant", folder / "test" / "ant")
    data._shared_raw_split.cache_clear()
    assert run("short") == 0


def test_init_from_starts_a_new_schedule_at_exported_weights(tmp_path, data_dir, monkeypatch, capsys):
    """--init-from loads an export's weights before the first step, and its card says where the run started;
    a backbone trained on another validation split, or combined with --resume, is refused in one line."""
    assert run_backbone(tmp_path / "first", data_dir, limit=64) == 0
    start = tmp_path / "first" / "run" / "backbone"
    seen = []  # the weights each epoch starts from
    run_epoch = training_step.run_epoch

    def recorded(step, *args, **kwargs):
        seen.append({k: v.clone() for k, v in step.model.state_dict().items()})
        return run_epoch(step, *args, **kwargs)

    monkeypatch.setattr(backbone, "run_epoch", recorded)
    assert run_backbone(tmp_path / "second", data_dir, "--init-from", str(start), limit=64) == 0
    exported, _ = load_backbone(start)
    assert all(torch.equal(seen[0][k], v) for k, v in exported.state_dict().items())
    config = json.loads((tmp_path / "second" / "run" / "backbone" / "config.json").read_text())
    first = json.loads((start / "config.json").read_text())
    assert config["recipe"]["init_from"] == {"path": str(start), "epochs": 1,
                                             "test_accuracy": first["test_accuracy"]}
    card = (tmp_path / "second" / "run" / "backbone" / "MODEL_CARD.md").read_text()
    assert f"Started from the weights of {start} (1 epochs, {100 * first['test_accuracy']:.2f}% test)" in card
    # an export from a re-encoded copy of the data set: its colours differ a little, as train.py accepts them
    recoded = Path(shutil.copytree(start, tmp_path / "recoded"))
    recoded_config = {**first, "val_fingerprint": [[v + 1.5 for v in image] for image in first["val_fingerprint"]]}
    (recoded / "config.json").write_text(json.dumps(recoded_config))
    assert run_backbone(tmp_path / "from_recoded", data_dir, "--init-from", str(recoded), limit=64) == 0
    capsys.readouterr()
    (recoded / "config.json").write_text(json.dumps({**first, "val_drawn_from": first["val_drawn_from"] - 1}))
    assert run_backbone(tmp_path / "from_shorter", data_dir, "--init-from", str(recoded), limit=64) == 2
    assert (f"(it drew it from {first['val_drawn_from'] - 1} training images, this run from "
            f"{first['val_drawn_from']})") in capsys.readouterr().err

    assert run_backbone(tmp_path / "other", data_dir, "--init-from", str(start), "--split-seed", "1", limit=64) == 2
    err = capsys.readouterr().err
    assert "its val_fingerprint is not this run's (it held out other images: another --split-seed" in err, err
    assert err.count("\n") == 1, err
    assert run_backbone(tmp_path / "smaller", data_dir, "--init-from", str(start), limit=32) == 2
    err = capsys.readouterr().err
    assert "(it recorded a validation split of 64 images, this run's has 32 (--val-size, --limit))" in err, err
    assert run_backbone(tmp_path / "second", data_dir, "--init-from", str(start), "--resume", limit=64) == 2
    assert "cannot be combined with --resume" in capsys.readouterr().err
    # an export that does not read is refused before the data is decoded (here there is none to decode)
    truncated = Path(shutil.copytree(start, tmp_path / "truncated"))
    (truncated / "model.safetensors").write_bytes((truncated / "model.safetensors").read_bytes()[:100])
    assert run_backbone(tmp_path / "third", tmp_path / "no_data", "--init-from", str(truncated), "--no-download",
                        limit=64) == 2
    assert capsys.readouterr().err.startswith(f"error: --init-from {truncated}: cannot read weights in")


def test_pretrained_weights_where_the_hub_does_not_answer_come_from_the_cache_only(monkeypatch, caplog, tmp_path):
    """Offline, huggingface_hub would retry each weights file for about half a minute, logging every try: the Hub
    is asked once, and without an answer the weights come from the local cache (an empty one here), so the error
    comes at once, with no retries logged; Hugging Face's offline setting is left as found."""
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "http://127.0.0.1:1")  # nobody answers there
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)  # as without HF_HUB_OFFLINE set
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))  # whatever HF_HOME says
    assert not backbone_checkpoint.hub_answers()
    with pytest.raises(CheckpointError, match="could not load pretrained weights for vit_tiny_patch16_224"):
        create_vit("vit_tiny_patch16_224", 10, {"img_size": 32, "patch_size": 4}, pretrained=True)
    assert "Retrying" not in caplog.text and huggingface_hub.constants.HF_HUB_OFFLINE is False
