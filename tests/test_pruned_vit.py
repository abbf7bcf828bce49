"""PrunedViT (policies/pruned_vit.py) and the policy export (policies/export.py).

The API must give what evaluate.py reports (the same compositions of the pruned forwards), move to a device,
run a policy at another budget, cost what envs.vit.flops says, and load an exported checkpoint without
opening a pickle; the README's example must run as written.
"""

from __future__ import annotations

import _pickle
import copy
import json
import pickle
import re
import shutil
import warnings
from collections import Counter
from pathlib import Path

import pytest
import ray.cloudpickle
import timm
import torch
from ray.rllib.core.columns import Columns

from envs.errors import UsageError
from envs.problem import ProblemError
from envs.vit.backbone_checkpoint import CheckpointError, save_backbone, weights_digest
from envs.vit.data import DATA_DIR_ENV, load_split
from envs.vit.flops import ViTSpec, exact_budget_schedule, image_gflops, tome_gflops, unpruned_gflops
from envs.vit.pruned_forward import exact_forward
from envs.vit.tome import tome_forward, tome_schedule
from evaluation.methods import Method
from policies.cascade import CascadeViT, doubt
from policies.checkpoints import (
    EXPORT_CONFIG,
    EXPORT_WEIGHTS,
    PRUNING_CONFIG,
    PolicyCheckpointError,
    export_path,
    has_export,
    load_exported_policies,
    load_rllib_policies,
)
from policies.decisions import DEFAULT_PROTECTED_SHARE, policy_selector
from policies.export import export_policies
from policies.export import main as export_main
from policies.heuristics import HEURISTICS, heuristic_selector
from policies.pruned_vit import SELECTIONS, PrunedViT
from policies.token_scorer import DEAD_SCORE, TokenScorer
from tests.conftest import CIFAR_CLASSES
from tests.host_reads import HostReads
from tests.readme_examples import run_readme_example
from tests.tiny_policies import NUM_PATCHES, PRUNE_POINTS, TARGET_RATIO, write_checkpoint

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def images(tiny_staged) -> torch.Tensor:
    """Normalised random images ``[6, 3, 32, 32]``."""
    pixels = torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    return PrunedViT(tiny_staged[0], tiny_staged[1]).normalize(pixels)


def assert_same(result: tuple[torch.Tensor, torch.Tensor], expected: tuple[torch.Tensor, torch.Tensor]) -> None:
    torch.testing.assert_close(result[0], expected[0], rtol=0, atol=0)
    assert torch.equal(result[1], expected[1])


def exact_budget_forward(vit, images: torch.Tensor, select, ratio: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``exact_forward``'s logits and ``kept [B, num_stages]``, the exact budget's schedule for every image: what
    ``PrunedViT.forward_with_kept`` must give for the same selector."""
    kept = torch.tensor(exact_budget_schedule(NUM_PATCHES, len(PRUNE_POINTS), ratio)).expand(len(images), -1)
    return exact_forward(vit, images, select, ratio, "merge"), kept


# -- the same numbers as the compositions evaluate.py reported -------------------------------------------------


@pytest.mark.parametrize("name", [*HEURISTICS, "tome"])
def test_from_heuristic_is_the_heuristic_forward(name, tiny_backbone, tiny_staged, images):
    model = PrunedViT.from_heuristic(tiny_backbone, name, TARGET_RATIO, prune_points=PRUNE_POINTS)
    vit = tiny_staged[0]
    with torch.inference_mode():
        if name == "tome":
            spec = ViTSpec.from_model(vit.vit)
            schedule = exact_budget_schedule(NUM_PATCHES, len(PRUNE_POINTS), TARGET_RATIO)
            merges = tome_schedule(spec, image_gflops(spec, PRUNE_POINTS, schedule, "merge", "similarity").total)
            expected = tome_forward(vit, images, merges)
            assert model.tome_merges == merges
            torch.testing.assert_close(model(images), expected, rtol=0, atol=0)
        else:
            select = heuristic_selector(name, torch.Generator().manual_seed(0))
            assert_same(model.forward_with_kept(images), exact_budget_forward(vit, images, select, TARGET_RATIO))


def test_a_policy_checkpoint_given_as_a_backbone_is_named_one(tiny_policy):
    """from_heuristic (or --backbone) given a policy checkpoint or its export said only that it held no
    config.json, as for any directory."""
    for given in (tiny_policy, export_path(tiny_policy)):
        with pytest.raises(CheckpointError, match=rf"^{re.escape(str(given))} is not a backbone checkpoint \(no "
                                                  r"config.json\): it is a policy checkpoint, which names its "
                                                  r"backbone itself \(evaluate.py --checkpoint PATH, "
                                                  r"PrunedViT.from_checkpoint\)$"):
            PrunedViT.from_heuristic(given, "similarity", TARGET_RATIO)


def test_tome_merges_whatever_the_reduction(tiny_staged, images):
    """evaluate.py's --reduction drop said every pruned row dropped its tokens; ToMe's row merged them all the same
    (as ToMe does), which its docs now say: drop sets only the cost its merges match."""
    merged, dropped = (PrunedViT(*tiny_staged, "tome", TARGET_RATIO, reduction) for reduction in ("merge", "drop"))
    at_cost = PrunedViT(*tiny_staged, "tome", TARGET_RATIO, "drop", tome_gflops=merged.gflops().total)
    assert torch.equal(at_cost(images), merged(images))
    assert dropped.gflops().total <= merged.gflops().total


def test_unpruned_model_is_the_timm_model(tiny_staged, images):
    model = PrunedViT(*tiny_staged)
    logits, kept = model.forward_with_kept(images)
    with torch.inference_mode():
        torch.testing.assert_close(logits, tiny_staged[0].vit(images), rtol=0, atol=0)
    assert kept.tolist() == [[NUM_PATCHES] * 4] * len(images)
    assert model.class_names == tuple(tiny_staged[1]["class_names"])  # what each logit is
    assert PrunedViT(tiny_staged[0], {**tiny_staged[1], "class_names": None}).class_names is None


def test_from_checkpoint_is_the_policy_forward_and_evaluates_rows(unexported_policy, tiny_policy, tiny_staged,
                                                                   images):
    """The RLlib checkpoint (read from its pickles, with their warning) and its export give the same model;
    evaluate.py's row is that model."""
    modules, _ = load_rllib_policies(unexported_policy)
    vit, config = tiny_staged
    with torch.inference_mode():
        select = policy_selector(modules, vit, TARGET_RATIO, DEFAULT_PROTECTED_SHARE)
        expected = exact_budget_forward(vit, images, select, TARGET_RATIO)
    with pytest.warns(UserWarning, match="has no export: its policies are read from RLlib's pickled files"):
        unpickled = PrunedViT.from_checkpoint(unexported_policy)
    for model in (unpickled, PrunedViT.from_checkpoint(tiny_policy)):
        assert (model.selection, model.budget, model.reduction) == ("policy", 0.5, "merge")
        assert_same(model.forward_with_kept(images), expected)
    row = Method("MARL", "policy", TARGET_RATIO, modules).model(vit, config, "merge")
    assert_same(row.forward_with_kept(images), expected)


def test_what_is_no_checkpoint_is_refused_without_the_pickle_warning(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the warning about RLlib's pickles would fail the test
        with pytest.raises(PolicyCheckpointError, match="is not a policy checkpoint"):
            PrunedViT.from_checkpoint(tmp_path)


def test_to_device_moves_backbone_and_policies(tiny_policy, images):
    model = PrunedViT.from_checkpoint(tiny_policy)
    logits = model(images)
    assert model.to("cpu") is model and model.device == torch.device("cpu")
    assert {p.device.type for p in model.parameters()} == {"cpu"}
    assert any(p is q for p in model.parameters() for q in model.policies["attention"].parameters())
    torch.testing.assert_close(model(images), logits, rtol=0, atol=0)
    assert not model.training and not logits.requires_grad


def test_a_policy_model_cast_to_another_precision_runs_in_it(tiny_policy, images):
    """``model.to(dtype)`` as with a timm model: the features, computed in float32, meet the agents' cast
    networks; float64 keeps float32's choices and answers on these images."""
    logits, kept = PrunedViT.from_checkpoint(tiny_policy).forward_with_kept(images)
    for dtype in (torch.float64, torch.bfloat16):
        cast_logits, cast_kept = PrunedViT.from_checkpoint(tiny_policy).to(dtype).forward_with_kept(images.to(dtype))
        assert cast_logits.dtype == dtype and cast_kept.shape == kept.shape
        if dtype == torch.float64:
            assert torch.equal(cast_kept, kept) and torch.equal(cast_logits.argmax(1), logits.argmax(1))


def test_every_forward_makes_its_tensors_where_the_images_are(tiny_policy, tiny_staged, images):
    """No forward makes a tensor on the default device: on a GPU that would be the CPU, beside images on the GPU.
    With meta as the default device such a tensor cannot meet the CPU images, so every selection, the agents and
    a cascade run only if each tensor is made where the images are (or, for the kept counts, on the CPU,
    deliberately)."""
    staged, config = tiny_staged
    modules = dict(PrunedViT.from_checkpoint(tiny_policy).policies)
    models = [PrunedViT(staged, config), *(PrunedViT(staged, config, name, TARGET_RATIO) for name in SELECTIONS),
              PrunedViT(staged, config, modules, TARGET_RATIO),
              CascadeViT(PrunedViT(staged, config, "similarity", 0.8), PrunedViT(staged, config, modules, 0.3), -1.0)]
    torch.set_default_device("meta")
    try:
        outputs = [model.forward_with_kept(images) for model in models]
    finally:
        torch.set_default_device(None)
    assert {(logits.device.type, kept.device.type) for logits, kept in outputs} == {("cpu", "cpu")}


def test_a_forward_reads_nothing_back(tiny_policy, tiny_staged, images):
    """On a GPU a batch-1 forward is bound by its waits for the device, so a pruned forward reads back no more
    than the unpruned model: the budget's counts are known on the host, and the policy networks score every row
    of a state (``every_row``) rather than gather its live ones. A forward makes only CPU tensors from Python ints
    (``lift_fresh``): its kept counts."""
    staged, config = tiny_staged
    modules = dict(PrunedViT.from_checkpoint(tiny_policy).policies)
    models = {"none": PrunedViT(staged, config), "agents": PrunedViT(staged, config, modules, TARGET_RATIO),
              **{name: PrunedViT(staged, config, name, TARGET_RATIO) for name in SELECTIONS}}
    reads = {}
    for name, model in models.items():
        calls = []
        with HostReads(calls):
            model.forward_with_kept(images)
        reads[name] = Counter(calls)
    assert reads == {name: Counter({"aten.lift_fresh.default": 1}) for name in models}


@pytest.mark.parametrize("selection", ["none", *SELECTIONS, "agents", "cascade"])
def test_a_compiled_forward_is_one_graph_with_the_eager_logits(selection, tiny_policy, tiny_staged, images):
    """torch.compile makes a forward one graph (which a GPU replays as a CUDA graph, evaluate.py --compile) only
    if nothing in it is read back or shaped by the data: so is every selection's but the random heuristic's,
    whose generator it does not trace (``fullgraph`` fails on a graph break), with the eager forward's logits. A
    cascade compiles its two forwards; which images run the second is chosen eagerly, and at batch 1 it gives the
    second none or one. Shapes are fixed here, one batch size (the cascade's two), faster to trace; graphs for
    any batch size (``dynamic``), batch 1 among them, are test_evaluate's for the unpruned, ToMe and agents'
    rows; a heuristic's graph at batch 1 is checked nowhere (its cost here: about 25 s of the suite)."""
    staged, config = tiny_staged
    modules = dict(PrunedViT.from_checkpoint(tiny_policy).policies)

    def build() -> PrunedViT | CascadeViT:
        if selection == "cascade":  # the less sure half of the images run the second forward
            first = PrunedViT(staged, config, "attention", 0.8)
            return CascadeViT(first, PrunedViT(staged, config, modules, 0.3), doubt(first(images)).median().item())
        return PrunedViT(staged, config, *{"none": (), "agents": (modules, TARGET_RATIO)}.get(
            selection, (selection, TARGET_RATIO)))

    torch.compiler.reset()
    compiled, eager = build(), build()
    compiled.compile(backend="eager", fullgraph=selection != "random", dynamic=False)
    for batch in (images, images[:1]) if selection == "cascade" else (images,):  # random: generators draw alike
        assert_same(compiled.forward_with_kept(batch), eager.forward_with_kept(batch))
    if selection == "cascade":
        assert compiled.reran(compiled.forward_with_kept(images)[1]).sum() == len(images) // 2


def test_budget_override_changes_the_kept_counts(tiny_policy, tiny_staged, images):
    """The policy run at another budget than it was trained at is the exact forward at that budget, whose
    selector keeps the override's token counts (checked on its masks: check_counts)."""
    trained = PrunedViT.from_checkpoint(tiny_policy)
    other = PrunedViT.from_checkpoint(tiny_policy, budget=0.3)
    assert trained.schedule() == [64, 32, 16, 8] and other.schedule() == [64, 45, 31, 22] and other.budget == 0.3
    modules, _ = load_rllib_policies(tiny_policy)
    vit, _ = tiny_staged
    with torch.inference_mode():
        select = policy_selector(modules, vit, 0.3, DEFAULT_PROTECTED_SHARE)
        logits, kept = exact_budget_forward(vit, images, select, 0.3)
    assert kept[0].tolist() == [64, 45, 31, 22]
    assert_same(other.forward_with_kept(images), (logits, kept))
    assert not torch.equal(logits, trained(images))
    with pytest.raises(ProblemError, match=r"budget must be in \(0, 1\), got 1.5"):
        PrunedViT.from_checkpoint(tiny_policy, budget=1.5)


def test_invalid_combinations_are_refused(tiny_staged):
    with pytest.raises(ValueError, match="unpruned model takes no budget"):
        PrunedViT(*tiny_staged, None, 0.5)
    with pytest.raises(ValueError, match="unknown selection 'greedy'"):
        PrunedViT(*tiny_staged, "greedy", 0.5)
    with pytest.raises(ValueError, match="tome_gflops sets ToMe's cost"):
        PrunedViT(*tiny_staged, "similarity", 0.5, tome_gflops=0.1)
    with pytest.raises(ProblemError, match=r"^budget must be a number, got None \(NoneType\)$"):
        PrunedViT(*tiny_staged, "random")
    with pytest.raises(ProblemError, match=r"protected_share must be in \(0, 1\], got 2.0"):
        PrunedViT(*tiny_staged, "random", 0.5, protected_share=2.0)


def test_the_random_heuristic_is_seeded_from_a_backbone_too_and_a_bad_seed_is_refused(tiny_backbone, images):
    """from_heuristic took no seed, so its random heuristic drew seed 0's tokens whatever the caller wanted; a
    seed torch cannot take failed at the first forward, in torch's words."""
    def drawn(seed: int) -> torch.Tensor:
        return PrunedViT.from_heuristic(tiny_backbone, "random", TARGET_RATIO, prune_points=PRUNE_POINTS,
                                        seed=seed)(images)

    assert torch.equal(drawn(3), drawn(3)) and not torch.equal(drawn(3), drawn(0))
    for seed in ("1", 1.5, None, True, -1, 2**32):
        with pytest.raises(UsageError, match=rf"^seed must be an integer in \[0, 4294967295\], got "
                                             rf"{re.escape(repr(seed))}$"):
            PrunedViT.from_heuristic(tiny_backbone, "random", TARGET_RATIO, prune_points=PRUNE_POINTS, seed=seed)


def test_token_counts_of_another_model_are_refused_by_its_costs(tiny_staged, images):
    """A cascade's kept (or one image's counts of another schedule) ended in a ValueError from envs.vit.flops, a
    plain one, as if a bug, and a row of kept given to mean_gflops in a TypeError."""
    model = PrunedViT(*tiny_staged, "similarity", 0.6)
    cascade = CascadeViT(model, PrunedViT(*tiny_staged, "similarity", 0.2))
    _, kept = cascade.forward_with_kept(images)
    stages = tiny_staged[0].num_stages
    with pytest.raises(UsageError, match=rf"^kept_per_stage must hold {stages} patch-token counts, one per stage of "
                                         rf"pruning points \(1, 2, 3\), got {2 * stages} \(a row of this model's "):
        model.mean_gflops(kept)
    with pytest.raises(UsageError, match=rf"^kept must be \[B, {stages}\] \(forward_with_kept's\), got \[{stages}\]$"):
        model.mean_gflops(kept[0, :stages])
    assert model.mean_gflops(kept[:, :stages]) == pytest.approx(model.gflops())


def test_a_cost_that_is_no_positive_number_is_refused(tiny_staged):
    """A NaN ToMe cost ran ToMe unpruned, a NaN cascade budget ran every image twice, and the mean cost of no
    images was a ZeroDivisionError."""
    for value in (float("nan"), -1.0, 0, "0.1"):
        with pytest.raises(UsageError, match=rf"^tome_gflops must be a positive number of GFLOPs, got {value!r}$"):
            PrunedViT(*tiny_staged, "tome", 0.5, tome_gflops=value)
    cascade = CascadeViT(PrunedViT(*tiny_staged, "similarity", 0.6), PrunedViT(*tiny_staged, "similarity", 0.2))
    images = cascade.normalize(torch.zeros(2, 3, 32, 32, dtype=torch.uint8))
    with pytest.raises(UsageError, match=r"^budget_gflops must be a positive number of GFLOPs, got nan$"):
        cascade.calibrate(images, float("nan"))
    with pytest.raises(UsageError, match="^mean_gflops needs the token counts of one image or more"):
        cascade.mean_gflops(torch.zeros(0, 2 * tiny_staged[0].num_stages, dtype=torch.long))


def test_an_inference_model_stays_in_eval_mode(tiny_staged):
    """model.train() (a training loop's habit) turned stochastic depth back on: answers changed from call to
    call."""
    model = PrunedViT(*tiny_staged, "similarity", 0.5)
    with pytest.warns(UserWarning, match="^PrunedViT is an inference model: it stays in eval mode"):
        assert model.train() is model
    assert not any(module.training for module in model.modules())
    cascade = CascadeViT(model, PrunedViT(*tiny_staged, "similarity", 0.2))
    with pytest.warns(UserWarning) as warned:
        cascade.train()
    assert [str(warning.message) for warning in warned] == [
        "CascadeViT is an inference model: it stays in eval mode (dropout and stochastic depth off)"]
    assert not any(module.training for module in cascade.modules())


def test_a_model_in_another_dtype_takes_the_images_normalize_gives_it(tiny_staged, tiny_policy):
    """After model.to(torch.float64) the README's model(model.normalize(images)) was torch's traceback: normalize
    returns the weights' dtype, and other images are refused in one line outside autocast."""
    model = PrunedViT(*tiny_staged, "similarity", 0.5)
    pixels = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    expected = model(model.normalize(pixels))
    staged, config = tiny_staged
    wide = PrunedViT(copy.deepcopy(staged), config, "similarity", 0.5).to(torch.float64)  # the fixture is shared
    modules, _ = load_rllib_policies(tiny_policy)
    assert wide.normalize(pixels).dtype == torch.float64
    torch.testing.assert_close(wide(wide.normalize(pixels)).float(), expected, rtol=1e-4, atol=1e-4)
    with pytest.raises(UsageError, match=r"^the images are torch.float32, the model's weights torch.float64: pass "
                                         r"images.to\(torch.float64\)"):
        wide(model.normalize(pixels))
    for selection in ("policy", "tome"):  # the README's bfloat16, through the agents' networks and ToMe's merging
        narrow = PrunedViT(copy.deepcopy(staged), config, modules if selection == "policy" else selection, 0.5)
        narrow = narrow.to(torch.bfloat16)
        assert narrow(narrow.normalize(pixels)).dtype == torch.bfloat16


def test_normalize_takes_uint8_and_unit_range_images(tiny_staged):
    model = PrunedViT(*tiny_staged)
    pixels = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(model.normalize(pixels), model.normalize(pixels.float() / 255))
    with pytest.raises(ValueError, match=r"floating-point images must be in \[0, 1\]"):
        model.normalize(pixels.float())  # 0-255 as floats would be scaled by 255 twice


@pytest.mark.parametrize(("given", "message"), [
    (lambda pixels: pixels.float() / 127.5 - 1, r"floating-point images must be in \[0, 1\], got values in \[-1, 1\]"),
    (lambda pixels: torch.full(pixels.shape, float("nan")), r"in \[0, 1\], got values in \[nan, nan\]"),
    (lambda pixels: pixels.long(), r"uint8 in \[0, 255\] or floating point in \[0, 1\], got torch.int64"),
    (lambda pixels: pixels > 127, r"uint8 in \[0, 255\] or floating point in \[0, 1\], got torch.bool"),
])
def test_normalize_refuses_images_of_an_unknown_scale(tiny_staged, given, message):
    """Images already normalised to [-1, 1], NaN, or integers other than uint8 were normalised as if in [0, 1]
    (only a maximum above 1 was refused): wrong answers without a word. Each is named."""
    model = PrunedViT(*tiny_staged)
    pixels = torch.tensor([0, 255], dtype=torch.uint8).repeat(3 * 32 * 16).reshape(1, 3, 32, 32)
    with pytest.raises(ValueError, match=message):
        model.normalize(given(pixels))
    assert model.normalize(pixels[:0].float()).shape == (0, 3, 32, 32)  # an empty batch has no range to check


@pytest.mark.parametrize(("given", "message"), [
    (lambda pixels: pixels.numpy(), r"must be a torch tensor \[B, 3, H, W\], got ndarray \(model.preprocess\(\[...\]\) "
                                    r"reads PIL images and files; torch.from_numpy"),
    (lambda pixels: list(pixels), r"^images must be a torch tensor \[B, 3, H, W\], got a list of 2 tensors "
                                  r"\(torch.stack\(images\) makes images \[3, H, W\] a batch\)$"),
    (lambda pixels: pixels.permute(0, 2, 3, 1), r"got \[2, 32, 32, 3\]; channels last\? images.permute"),
    (lambda pixels: pixels[0], r"got \[3, 32, 32\]; one image\? images.unsqueeze\(0\)"),
    (lambda pixels: pixels[..., :16, :16], r"\[B, 3, 32, 32\], got \[2, 3, 16, 16\]; model.preprocess\(\[...\]\) fits "
                                           r"PIL images to the backbone's input size, 32x32"),
    (lambda pixels: pixels[:, :1], r"got \[2, 1, 32, 32\]; grey or with alpha\? model.preprocess\(\[...\]\) makes PIL "
                                   r"images RGB"),
])
def test_images_of_another_shape_or_type_are_named(tiny_staged, given, message):
    """What a user may hold instead of ``[B, 3, H, W]`` tensors is named, with the conversion, by normalize and
    by the model itself, not found by a convolution deep inside it."""
    model = PrunedViT(*tiny_staged, "similarity", 0.5)
    pixels = torch.zeros(2, 3, 32, 32, dtype=torch.uint8)
    with pytest.raises(ValueError, match=message):
        model.normalize(given(pixels))
    with pytest.raises(ValueError, match=message):
        model(given(pixels.float()))
    with pytest.raises(ValueError, match=r"takes normalised images, got torch.uint8: model\(model.normalize"):
        model(pixels)


def test_preprocess_decodes_ones_own_images_as_the_data_sets_do(tiny_staged, image_folder_224):
    """PIL images or files of any size and mode, as a split decodes them for the backbone (RGB, the short side
    resized, centre-cropped): the images a data set's test split holds, read one by one."""
    from PIL import Image

    model = PrunedViT(*tiny_staged)
    files = sorted((image_folder_224 / "test").rglob("*.jpg"))
    decoded = load_split("folder", "test", image_folder_224, input_size=32).images
    got = model.preprocess([files[0], Image.open(files[1]), *files[2:]])
    assert got.dtype == torch.uint8 and got.shape == decoded.shape
    assert sorted(map(bytes, got.flatten(1).numpy())) == sorted(map(bytes, decoded.flatten(1).numpy()))
    assert model.preprocess([Image.new("LA", (20, 90))]).shape == (1, 3, 32, 32)  # grey with alpha, tall
    with pytest.raises(UsageError, match=r"preprocess takes a list of images \(or files\): model.preprocess"):
        model.preprocess(Image.open(files[0]))
    with pytest.raises(UsageError, match=r"cannot read image .*nowhere.png: "):
        model.preprocess([image_folder_224 / "nowhere.png"])
    with pytest.raises(UsageError, match=r"^preprocess takes one image or more, got none$"):
        model.preprocess([])
    with pytest.raises(UsageError, match=r"^preprocess reads PIL images or image files, got Tensor \(a batch tensor "):
        model.preprocess(decoded)


def test_preprocess_names_an_image_whose_file_was_closed_before_it_was_read(tiny_staged, tmp_path):
    """PIL reads pixels lazily: images opened in a with block that had ended made preprocess fail on a bare
    AssertionError, a truncated file on PIL's OSError traceback."""
    from PIL import Image

    Image.new("RGB", (40, 30), "teal").save(tmp_path / "teal.png")
    with Image.open(tmp_path / "teal.png") as closed:
        pass
    model = PrunedViT(*tiny_staged)
    with pytest.raises(UsageError, match=r"^cannot read image 1 of the list: its file was closed before its pixels "
                                         r"were read \(read it while its file is open: image.load\(\) inside the "
                                         r"with block of Image.open; or pass the file's path\)$"):
        model.preprocess([Image.new("RGB", (40, 30)), closed])
    (tmp_path / "cut.png").write_bytes((tmp_path / "teal.png").read_bytes()[:-30])
    with pytest.raises(UsageError, match=r"^cannot read image 0 of the list: [^(]+$"):
        model.preprocess([Image.open(tmp_path / "cut.png")])
    with Image.open(tmp_path / "teal.png") as image:
        image.load()
    assert torch.equal(model.preprocess([image]), model.preprocess([tmp_path / "teal.png"]))


def test_preprocess_names_an_image_of_more_pixels_than_pil_opens(tiny_staged, tmp_path, monkeypatch):
    """PIL's DecompressionBombError is no OSError: a file over twice its pixel limit ended in its traceback."""
    from PIL import Image

    Image.new("1", (40, 30)).save(tmp_path / "huge.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 500)  # 1,200 pixels: over twice the limit
    with pytest.raises(UsageError, match=rf"^cannot read image {re.escape(str(tmp_path / 'huge.png'))}: Image size "
                                         r"\(1200 pixels\) exceeds limit"):
        PrunedViT(*tiny_staged).preprocess([tmp_path / "huge.png"])


@pytest.mark.parametrize(("mode", "level", "described"), [("F", 0.5, r"32-bit floating-point \(PIL mode F, values in "
                                                           r"\[0.5, 0.5\]\)"),
                                                          ("I", 40000, r"32-bit integer \(PIL mode I, values in "
                                                                       r"\[40000, 40000\]\)")], ids=["F", "I"])
def test_preprocess_refuses_grey_images_of_no_known_scale(tiny_staged, tmp_path, mode, level, described):
    """PIL converts a 32-bit image to RGB by clipping its levels to [0, 255]: one in [0, 1] (Image.fromarray of a
    float array) was read as black, one of 16-bit levels in a 32-bit TIFF as white, and answered for."""
    from PIL import Image

    model = PrunedViT(*tiny_staged)
    image = Image.new(mode, (40, 40), level)
    image.save(tmp_path / "grey.tif")
    with pytest.raises(UsageError, match=rf"^image 1 of the list is {described}, whose scale is unknown: make it "
                                         r"8-bit first, e\.g\. Image\.fromarray"):
        model.preprocess([Image.new("RGB", (40, 40)), image])
    with pytest.raises(UsageError, match=rf"^image {re.escape(str(tmp_path / 'grey.tif'))} is {described}"):
        model.preprocess([tmp_path / "grey.tif"])
    assert model.preprocess([Image.new("I;16", (40, 40), 65535)]).min() == 255  # 16-bit: scaled, as data sets do


# -- GFLOPs: envs.vit.flops, nothing else -----------------------------------------------------------------------


def test_gflops_per_image_are_the_analytic_counts(tiny_policy, tiny_backbone, tiny_staged, images):
    spec = ViTSpec.from_model(tiny_staged[0].vit)
    schedule = exact_budget_schedule(NUM_PATCHES, len(PRUNE_POINTS), TARGET_RATIO)
    policy = PrunedViT.from_checkpoint(tiny_policy)
    macs = sum(module.macs_per_token() for module in policy.policies.values())
    assert policy.gflops() == image_gflops(spec, PRUNE_POINTS, schedule, "merge", "agents", macs)
    greedy = PrunedViT.from_heuristic(tiny_backbone, "similarity", TARGET_RATIO, prune_points=PRUNE_POINTS)
    assert greedy.gflops() == image_gflops(spec, PRUNE_POINTS, schedule, "merge", "similarity")
    tome = PrunedViT.from_heuristic(tiny_backbone, "tome", TARGET_RATIO, prune_points=PRUNE_POINTS)
    assert tome.gflops() == tome_gflops(spec, tome.tome_merges)
    at_policy_cost = PrunedViT.from_heuristic(tiny_backbone, "tome", TARGET_RATIO, prune_points=PRUNE_POINTS,
                                              tome_gflops=policy.gflops().total)  # as evaluate.py's ToMe row
    assert at_policy_cost.tome_merges == tome_schedule(spec, policy.gflops().total) != tome.tome_merges
    assert PrunedViT(*tiny_staged).gflops().total == unpruned_gflops(spec)

    kept = torch.tensor([[64, 32, 16, 8], [64, 40, 20, 10], [64, 32, 16, 8]])  # per-image schedules average
    rows = [image_gflops(spec, PRUNE_POINTS, row, "merge", "agents", macs) for row in kept.tolist()]
    expected = [sum(row[part] for row in rows) / len(rows) for part in range(3)]
    assert list(policy.mean_gflops(kept)) == pytest.approx(expected, rel=1e-12)
    assert policy.gflops(kept[1].tolist()) == rows[1]


# -- the export ------------------------------------------------------------------------------------------------


def test_export_round_trip_gives_identical_modules(tiny_policy):
    original, info = load_rllib_policies(tiny_policy)
    loaded, loaded_info = load_exported_policies(tiny_policy)
    assert loaded_info == info and list(loaded) == list(original)
    config = json.loads((export_path(tiny_policy) / EXPORT_CONFIG).read_text())
    assert config["modules"]["attention"]["num_patches"] == NUM_PATCHES
    generator = torch.Generator().manual_seed(0)
    for name, module in original.items():
        copy = loaded[name]
        assert not copy.training and copy.hidden == module.hidden == module.model_config["hidden"]
        state = module.state_dict()
        assert copy.state_dict().keys() == state.keys()
        assert all(torch.equal(copy.state_dict()[key], value) for key, value in state.items())
        assert isinstance(copy, TokenScorer) and copy.macs_per_token() == module.macs_per_token()
        assert copy.token_shape == module.token_shape == module.observation_space["tokens"].shape
        tokens = torch.randn(3, NUM_PATCHES, module.observation_space["tokens"].shape[1], generator=generator)
        live = (torch.rand(3, NUM_PATCHES, generator=generator) > 0.3).float()
        batch = {Columns.OBS: {"tokens": tokens, "live": live, "count": live.sum(1, keepdim=True) // 2}}
        with torch.no_grad():  # the plain-torch scores are the RLlib module's distribution inputs
            torch.testing.assert_close(copy.token_scores(tokens, live),
                                       module.forward_inference(batch)[Columns.ACTION_DIST_INPUTS][:, :-1],
                                       rtol=0, atol=0)
            # every row scored, as the pruned forward does, is the same up to rounding, and dead rows still lose
            every_row = copy.token_scores(tokens, live, every_row=True)
            torch.testing.assert_close(every_row, copy.token_scores(tokens, live))
            assert (every_row[live == 0] == DEAD_SCORE).all() and (every_row[live == 1] > DEAD_SCORE).all()


def test_loading_an_export_never_unpickles(tiny_policy, images, monkeypatch):
    expected = PrunedViT.from_checkpoint(tiny_policy).forward_with_kept(images)

    def refuse(*args, **kwargs):
        raise AssertionError("a pickle was opened")

    for owner in (pickle, _pickle, ray.cloudpickle):  # RLlib reads its files with ray.cloudpickle's load
        for name in ("load", "loads", "Unpickler"):
            monkeypatch.setattr(owner, name, refuse, raising=False)
    monkeypatch.setattr(torch, "load", refuse)
    with pytest.raises(PolicyCheckpointError, match="a pickle was opened"):  # the patches bite RLlib's loader
        load_rllib_policies(tiny_policy)
    assert_same(PrunedViT.from_checkpoint(tiny_policy).forward_with_kept(images), expected)


def test_an_export_folder_given_itself_loads_and_a_missing_path_is_only_an_error(tiny_policy, images, tmp_path):
    """What is shared to avoid pickles is the ``export`` folder: given itself it is the checkpoint, with no
    warning about pickles, under its own name or another; a mistyped path is an error, not first a warning about
    pickles."""
    expected = PrunedViT.from_checkpoint(tiny_policy).forward_with_kept(images)
    for shared in (tmp_path / "received" / "export", tmp_path / "received" / "cifar10_policy"):
        shutil.copytree(export_path(tiny_policy), shared)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert_same(PrunedViT.from_checkpoint(shared).forward_with_kept(images), expected)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(PolicyCheckpointError, match="does not exist"):
            PrunedViT.from_checkpoint(tmp_path / "mistyped")


def test_export_command_and_damaged_exports(unexported_policy, tmp_path, capsys):
    path = Path(shutil.copytree(unexported_policy, tmp_path / "policy"))
    assert not has_export(path)
    assert export_main([str(path)]) == 0 and has_export(path)
    assert capsys.readouterr().out == f"wrote {export_path(path)}\n"
    assert export_main([str(tmp_path / "nowhere")]) == 2
    assert capsys.readouterr().err.startswith("error: checkpoint")
    assert export_main([]) == 2
    assert capsys.readouterr().err == "error: the following arguments are required: CHECKPOINT\n"
    export_only = tmp_path / "export_only"
    shutil.copytree(path, export_only, ignore=shutil.ignore_patterns("learner_group"))
    message = (f"error: checkpoint {export_only} holds its export ({export_path(export_only)}) but not RLlib's "
               "modules (learner_group/learner/rl_module/) to export from: it is exported already, and loading it "
               "reads the export\n")
    for given in (export_only, export_path(export_only)):  # as shared: nothing to export from
        assert export_main([str(given)]) == 2
        assert capsys.readouterr().err == message
    shared_alone = Path(shutil.copytree(export_path(path), tmp_path / "cifar10_policy"))  # renamed, as shared
    assert export_main([str(shared_alone)]) == 2
    assert capsys.readouterr().err == (f"error: {shared_alone} is a policy export (policy.json), not a checkpoint with "
                                       "RLlib's modules to export from: it is exported already, and loading it reads "
                                       "it\n")
    assert export_main([str(export_path(path))]) == 0  # a checkpoint's export folder stands for the checkpoint
    assert capsys.readouterr().out == f"wrote {export_path(path)}\n" and not export_path(export_path(path)).exists()
    with pytest.warns(UserWarning, match="has no export: its policies are read from RLlib's pickled files"):
        PrunedViT.from_checkpoint(unexported_policy)  # said, as pickles run the code of whoever wrote them
    weights = export_path(path) / EXPORT_WEIGHTS
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(PolicyCheckpointError, match="cannot read the policy export"):
        PrunedViT.from_checkpoint(path)


def test_a_backbone_trained_further_in_place_is_warned_of(tmp_path, tiny_backbone, images):
    """A policy checkpoint records a digest of the weights its agents learned on: the same path holding other
    weights since (backbone.py --resume re-exports in place) is warned of, once the weights are read, whether the
    path is the checkpoint's or given as its backbone."""
    from safetensors.torch import load_file, save_file

    backbone = Path(shutil.copytree(tiny_backbone, tmp_path / "backbone"))
    path = write_checkpoint(tmp_path / "policy", backbone)
    config = json.loads((path / PRUNING_CONFIG).read_text())
    (path / PRUNING_CONFIG).write_text(json.dumps({**config, "backbone_digest": weights_digest(backbone)}))
    export_policies(path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        before = PrunedViT.from_checkpoint(path)(images)
    weights = load_file(backbone / "model.safetensors")
    save_file({name: tensor * 1.01 for name, tensor in weights.items()}, backbone / "model.safetensors")
    changed = rf"the weights of backbone {backbone} have changed since checkpoint {path} was trained on them " \
              rf"\(trained further in place\?\)"
    with pytest.warns(UserWarning, match=changed):
        PrunedViT.from_checkpoint(path)
    with pytest.warns(UserWarning, match=changed):
        assert not torch.equal(PrunedViT.from_checkpoint(path, backbone=backbone)(images), before)


def test_a_backbone_given_in_place_of_the_learned_one_is_warned_of(tmp_path, tiny_backbone, images):
    """A backbone given in place of the checkpoint's (evaluate.py --backbone, backbone= in Python) whose weights
    are not those the agents learned on is warned of, one line: another seed, or another width, which the agents
    run on all the same (they take features, not embeddings). A copy of the learned weights elsewhere is silent."""
    path = write_checkpoint(tmp_path / "policy", tiny_backbone)
    config = json.loads((path / PRUNING_CONFIG).read_text())
    (path / PRUNING_CONFIG).write_text(json.dumps({**config, "backbone_digest": weights_digest(tiny_backbone)}))
    export_policies(path)
    copy_of_it = Path(shutil.copytree(tiny_backbone, tmp_path / "moved" / "backbone"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        expected = PrunedViT.from_checkpoint(path)(images)
        assert torch.equal(PrunedViT.from_checkpoint(path, backbone=copy_of_it)(images), expected)
    backbone_config = json.loads((tiny_backbone / "config.json").read_text())
    for name, kwargs in (("seed", {}), ("wide", {"embed_dim": 64, "num_heads": 4})):
        torch.manual_seed(1)
        model_kwargs = {**backbone_config["model_kwargs"], **kwargs}
        vit = timm.create_model(backbone_config["model_name"], num_classes=10, **model_kwargs)
        other = save_backbone(vit, {**backbone_config, "model_kwargs": model_kwargs}, tmp_path / name)
        with pytest.warns(UserWarning) as caught:
            model = PrunedViT.from_checkpoint(path, backbone=other)
        assert [str(warning.message) for warning in caught] == [
            f"the weights of backbone {other} are not those checkpoint {path} was trained on (another backbone, seed "
            f"or width?): its agents learned on {tiny_backbone}; train agents on this backbone (train.py --backbone) "
            f"to prune it as learned"]
        assert model(images).shape == expected.shape


def test_exported_policy_of_another_backbone_fails_the_same_check(tmp_path, tiny_backbone):
    path = write_checkpoint(tmp_path / "policy", tiny_backbone, num_patches=16)
    export_policies(path)
    with pytest.raises(PolicyCheckpointError, match="was it trained on another backbone"):
        PrunedViT.from_checkpoint(path)


# -- the README's example ------------------------------------------------------------------------------------------


def test_readme_python_api_example_runs_as_written(data_dir, monkeypatch, capsys):
    monkeypatch.setenv(DATA_DIR_ENV, str(data_dir))
    monkeypatch.chdir(REPO)
    run_readme_example("Python API")
    printed = capsys.readouterr().out.splitlines()
    assert len(printed) == 5 and printed[2] in CIFAR_CLASSES and printed[3].endswith("[64, 32, 16, 8]")
    assert printed[4].endswith("of 8 ran twice")
