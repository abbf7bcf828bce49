"""Search, then distil: can a scorer learn the token swaps that a search finds better than greedy similarity?

    python -m benchmarks.search_distil --data-dir ../shared/data      # about 10 minutes on a 2-core CPU

``content_headroom`` trained a scorer by a policy gradient: it sharpened the sets it drew and left its most
likely set (what ships) where greedy similarity put it. This gives the same scorer a direct signal for that
set instead. On each train image, greedy similarity's path is searched: at every pruning point, each of the
(up to) ``--window``² single swaps at the cut (one of the ``window`` lowest-ranked kept tokens out, one of the
``window`` highest-ranked removed tokens in; greedy similarity after it) runs in the exact pruned forward,
scored by the KL divergence from the unpruned model's prediction (label-free). Where the best swap lowers
the KL by more than ``--min-gain``, that swap is the target: the scorer (``content_headroom.ContentScorer``:
greedy similarity's keep rank plus a learned correction of each token's content and features, zero at the
start) is trained on the states of greedy similarity's path to rank the swapped-in token above the
swapped-out one, and every other pair of the window the other way round (a logistic loss on the score
difference over ``--temperature``).

It prints what the search found on train (the oracle: each image's best swap, an upper bound, not a method),
then after each epoch the share of targets the scorer's most likely sets (its top ``k``, what evaluation
keeps) make on greedy similarity's path and the share of the other images whose set they change; then those
sets' KL on the train images and the validation table of ``content_headroom`` on ``--val-images`` validation
images (never the test split). The train figures tell whether the targets can be fitted at all; the
validation table, whether what is fitted generalises. Measured: the search finds large room, and the scorer
fits little of it (benchmarks/README.md).
"""

from __future__ import annotations

import time
from typing import NamedTuple

import torch
import torch.nn.functional as F

from benchmarks import add_data_and_checkpoint_arguments, benchmark_parser, run_from_command_line
from benchmarks.content_headroom import (
    ContentScorer,
    greedy_keep_rank,
    kl_from_unpruned,
    print_validation,
    scorer_inputs,
    scorer_problem,
    scorer_selector,
)
from benchmarks.split_states import first_stage_states
from cli import non_negative_float, positive_float, positive_int, random_seed
from envs.vit.pruned_forward import Selector, TokenState, concat_states, exact_forward_from, prune_step
from envs.vit.scoring import percent_equal
from envs.vit.staged_vit import StagedViT
from envs.vit.token_ops import highest, tokens_to_keep
from policies.heuristics import heuristic_selector

GREEDY = heuristic_selector("similarity")


def recording_greedy_path() -> tuple[Selector, list[tuple[TokenState, torch.Tensor]]]:
    """Greedy similarity as a ``Selector`` (the top ``k`` of its keep rank), recording each state it chooses from
    and that rank ``[B, W]``, in order: the search reads both, and the rank is a sequential computation made
    once."""
    path: list[tuple[TokenState, torch.Tensor]] = []

    def select(state: TokenState, k: int) -> torch.Tensor:
        rank = greedy_keep_rank(state.patches, state.live)
        path.append((state, rank))
        return highest(rank, k, state.live)
    return select, path


def swap_candidates(rank: torch.Tensor, live: torch.Tensor, k: int, window: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``window`` lowest-ranked of the ``k`` kept tokens and the ``window`` highest-ranked removed ones of each
    image, by ``rank [B, W]`` (higher keeps): their row indices, ``[B, out]`` and ``[B, in]``, nearest the cut
    first. Each side has ``window`` rows, or as many as there are when fewer tokens are kept or removed."""
    order = rank.masked_fill(~live, float("-inf")).argsort(dim=1, descending=True)
    return order[:, :k].flip(1)[:, :window], order[:, k:k + window]


@torch.no_grad()
def swap_kl(staged: StagedViT, state: TokenState, rank: torch.Tensor, k: int, swaps: tuple[torch.Tensor, torch.Tensor],
            unpruned: torch.Tensor, target_ratio: float, reduction: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Each single swap's KL from the unpruned prediction and whether it keeps the unpruned answer,
    ``[B, out, in]`` each (swapped-out token, swapped-in token): at the pruning point ``state`` waits at,
    the top ``k`` by ``rank`` with the swap applied, then greedy similarity to the head."""
    out_rows, in_rows = swaps
    (batch, outs), ins = out_rows.shape, in_rows.shape[1]
    keep = highest(rank, k, state.live)
    images = torch.arange(batch)
    masks = []
    for a in range(outs):
        for b in range(ins):
            mask = keep.clone()
            mask[images, out_rows[:, a]] = False
            mask[images, in_rows[:, b]] = True
            masks.append(mask)
    repeated = state.rows(images.repeat(outs * ins))
    logits = exact_forward_from(staged, prune_step(staged, repeated, torch.cat(masks), reduction), GREEDY,
                                target_ratio, reduction)
    target = unpruned.repeat(outs * ins, 1)
    kl = kl_from_unpruned(target, logits).view(outs, ins, batch).permute(2, 0, 1)
    agree = (logits.argmax(1) == target.argmax(1)).view(outs, ins, batch).permute(2, 0, 1)
    return kl, agree


def pair_loss(scores: torch.Tensor, swaps: tuple[torch.Tensor, torch.Tensor], targets: torch.Tensor,
              temperature: float, positive_weight: float) -> torch.Tensor:
    """Logistic loss of ranking the swapped-in token above the swapped-out one where ``targets [B, out, in]``
    is 1 (the search's best swap) and below it elsewhere, from ``scores [B, W]``; the targets' terms weigh
    ``positive_weight`` (there is at most one per image, against ``out * in - 1`` others)."""
    out_rows, in_rows = swaps
    margin = (scores.gather(1, in_rows).unsqueeze(1) - scores.gather(1, out_rows).unsqueeze(2)) / temperature
    return F.binary_cross_entropy_with_logits(margin, targets, pos_weight=torch.tensor(positive_weight))


class PointSearch(NamedTuple):
    """What the search found at one pruning point on greedy similarity's path, for ``n`` images."""

    state: TokenState  # the images' states there (every image keeps the same count: no dead rows)
    rank: torch.Tensor  # [n, W] greedy similarity's keep rank (its top k are greedy similarity's keep set)
    swaps: tuple[torch.Tensor, torch.Tensor]  # [n, out] and [n, in]: the rows swapped out, and in
    kl: torch.Tensor  # [n, out, in] each swap's KL from the unpruned prediction
    agree: torch.Tensor  # [n, out, in] whether each swap keeps the unpruned answer


@torch.no_grad()
def search(staged: StagedViT, chunks: list[TokenState], unpruned: torch.Tensor, target_ratio: float,
           reduction: str, window: int) -> tuple[list[PointSearch], torch.Tensor, torch.Tensor]:
    """Search greedy similarity's path of the images of ``chunks`` (states at the first pruning point, in order;
    ``unpruned [n, C]`` their unpruned log-probabilities): per pruning point, what :class:`PointSearch` holds;
    and greedy similarity's own KL ``[n]`` and agreement ``[n]``."""
    found: list[list[PointSearch]] = [[] for _ in staged.prune_points]
    greedy_kl, greedy_agree, start = [], [], 0
    for chunk in chunks:
        target = unpruned[start:start + len(chunk.live)]
        start += len(chunk.live)
        record, path = recording_greedy_path()
        logits = exact_forward_from(staged, chunk, record, target_ratio, reduction)
        greedy_kl.append(kl_from_unpruned(target, logits))
        greedy_agree.append(logits.argmax(1) == target.argmax(1))
        for point, (state, rank) in enumerate(path):
            k = tokens_to_keep(state.live.shape[1], target_ratio)
            swaps = swap_candidates(rank, state.live, k, window)
            found[point].append(PointSearch(state, rank, swaps, *swap_kl(staged, state, rank, k, swaps, target,
                                                                         target_ratio, reduction)))
    joined = [PointSearch(concat_states([part.state for part in parts]), torch.cat([part.rank for part in parts]),
                          tuple(torch.cat(side) for side in zip(*(part.swaps for part in parts), strict=True)),
                          torch.cat([part.kl for part in parts]), torch.cat([part.agree for part in parts]))
              for parts in found]
    return joined, torch.cat(greedy_kl), torch.cat(greedy_agree)


def swap_targets(found: PointSearch, greedy_kl: torch.Tensor, min_gain: float) -> torch.Tensor:
    """``[n, out, in]``: 1 at each image's best swap at this pruning point where it lowers greedy
    similarity's KL by more than ``min_gain``, else 0."""
    best_kl, best = found.kl.flatten(1).min(dim=1)
    target = F.one_hot(best, found.kl[0].numel()).float().view_as(found.kl)
    return target * (greedy_kl - best_kl > min_gain).float().view(-1, 1, 1)


def distil(staged: StagedViT, found: list[PointSearch], targets: list[torch.Tensor], target_ratio: float, *,
           epochs: int, batch_size: int, lr: float, hidden: int, temperature: float, positive_weight: float
           ) -> ContentScorer:
    """A :class:`ContentScorer` trained by :func:`pair_loss` on the states of greedy similarity's path, to make
    each image's target swap at each pruning point; prints, after each epoch, the share of targets its top
    ``k`` makes there and the share of the other images whose top ``k`` it changes."""
    # the scorer's inputs on greedy similarity's path are fixed: read them once
    inputs = [[torch.cat(part) for part in zip(*(scorer_inputs(staged, point.state.rows(images), target_ratio)
                                                 for images in torch.arange(len(point.rank)).split(256)),
                                               strict=True)]
              for point in found]
    scorer = ContentScorer(staged.embed_dim, hidden)
    optimizer = torch.optim.Adam(scorer.parameters(), lr=lr)

    def path_scores(point: int, images: torch.Tensor) -> torch.Tensor:
        """``[b, W]``: the scorer's keep scores of ``images`` at ``point`` on greedy similarity's path."""
        return found[point].rank[images] + scorer.correction(*(value[images] for value in inputs[point]))

    def made_and_changed(point: int) -> tuple[float, float]:
        """At ``point``: the share of the images with a target whose swap the scorer's top ``k`` makes (the
        swapped-in token kept, the swapped-out one not), and of the other images whose top ``k`` is not greedy
        similarity's."""
        search, target = found[point], targets[point]
        images, best = torch.arange(len(target)), target.flatten(1).argmax(1)
        with torch.no_grad():
            scores = path_scores(point, images)
        k = tokens_to_keep(scores.shape[1], target_ratio)
        keep = highest(scores, k, search.state.live)
        ins = target.shape[2]
        out_row, in_row = search.swaps[0][images, best // ins], search.swaps[1][images, best % ins]
        made = keep[images, in_row] & ~keep[images, out_row]
        changed = (keep != highest(search.rank, k, search.state.live)).any(dim=1)
        has_target = target.flatten(1).any(dim=1)
        return made[has_target].double().mean().item(), changed[~has_target].double().mean().item()

    for epoch in range(epochs):
        started, losses = time.perf_counter(), []
        batches = [(point, images) for point, target in enumerate(targets)
                   for images in torch.randperm(len(target)).split(batch_size)]
        for index in torch.randperm(len(batches)).tolist():
            point, images = batches[index]
            swaps = tuple(side[images] for side in found[point].swaps)
            loss = pair_loss(path_scores(point, images), swaps, targets[point][images], temperature, positive_weight)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        made, changed = zip(*(made_and_changed(point) for point in range(len(found))), strict=True)
        print(f"[distil] epoch {epoch}: loss {sum(losses) / len(losses):.4f}; per pruning point, targets made "
              f"{', '.join(f'{100 * share:.1f}%' for share in made)}, other images changed "
              f"{', '.join(f'{100 * share:.1f}%' for share in changed)} ({time.perf_counter() - started:.0f} s)",
              flush=True)
    return scorer


def main(argv: list[str] | None = None) -> None:
    parser = benchmark_parser(__doc__)
    add_data_and_checkpoint_arguments(parser, "its backbone and problem")
    parser.add_argument("--train-images", type=positive_int, default=4000,
                        help="train images searched and distilled on")
    parser.add_argument("--val-images", type=positive_int, default=2000,
                        help="validation images it is scored on (never the test split)")
    parser.add_argument("--window", type=positive_int, default=3,
                        help="tokens on each side of the cut whose swaps are searched (default: %(default)s)")
    parser.add_argument("--min-gain", type=non_negative_float, default=0.002,
                        help="KL a swap must save to be a target (default: %(default)s)")
    parser.add_argument("--epochs", type=positive_int, default=10,
                        help="passes of the distillation over the searched sets")
    parser.add_argument("--batch-size", type=positive_int, default=64, help="images per search chunk and per update")
    parser.add_argument("--lr", type=positive_float, default=1e-3, help="the scorer's Adam learning rate")
    parser.add_argument("--positive-weight", type=non_negative_float, default=8.0,
                        help="of a target's term in the loss, against 1 for each other pair (default: %(default)s)")
    parser.add_argument("--hidden", type=positive_int, default=64, help="width of the scorer's networks")
    parser.add_argument("--temperature", type=positive_float, default=0.02,
                        help="of the score differences, in keep-rank units (default: %(default)s)")
    parser.add_argument("--seed", type=random_seed, default=0, help="seed of the scorer and its samples")
    args = parser.parse_args(argv)

    torch.manual_seed(args.seed)
    problem, staged, config = scorer_problem(args.checkpoint, "search_distil")
    ratio = problem.target_ratio

    started = time.perf_counter()
    chunks, unpruned, _ = first_stage_states(staged, config, problem, args.data_dir, "train", args.train_images,
                                             batch_size=args.batch_size)
    found, greedy_kl, greedy_agree = search(staged, chunks, unpruned, ratio, problem.reduction, args.window)
    print(f"[search] {len(greedy_kl)} train images, {len(found)} pruning points x up to {args.window ** 2} swaps "
          f"({time.perf_counter() - started:.0f} s); greedy similarity: KL {greedy_kl.mean():.4f}, "
          f"agreement {100 * greedy_agree.double().mean():.2f}%", flush=True)
    targets = []
    for point, search_there in enumerate(found):
        targets.append(swap_targets(search_there, greedy_kl, args.min_gain))
        gain = greedy_kl.view(-1, 1) - search_there.kl.flatten(1)
        best_gain = gain.max(dim=1).values
        quartiles = ", ".join(f"{q:.4f}" for q in best_gain.quantile(torch.tensor([0.25, 0.5, 0.75])).tolist())
        print(f"[search] pruning point {point}: a swap lowers the KL on {100 * (gain > 0).double().mean():.1f}% "
              f"of the (image, swap) pairs (mean change {(search_there.kl - greedy_kl.view(-1, 1, 1)).mean():+.5f}); "
              f"the best swap saves more than {args.min_gain} on "
              f"{100 * targets[-1].flatten(1).any(dim=1).double().mean():.1f}% of the images (quartiles of the "
              f"saving {quartiles})")
    every_kl = torch.cat([search_there.kl.flatten(1) for search_there in found], dim=1)
    every_agree = torch.cat([search_there.agree.flatten(1) for search_there in found], dim=1)
    best_kl, best = every_kl.min(dim=1)
    better = best_kl < greedy_kl
    oracle_agree = torch.where(better, every_agree.gather(1, best[:, None]).squeeze(1), greedy_agree)
    print(f"[search] oracle (each image's best single swap at any point, or none): KL "
          f"{torch.where(better, best_kl, greedy_kl).mean():.4f}, agreement {100 * oracle_agree.double().mean():.2f}%",
          flush=True)

    scorer = distil(staged, found, targets, ratio, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                    hidden=args.hidden, temperature=args.temperature, positive_weight=args.positive_weight)
    select = scorer_selector(staged, scorer, ratio)
    with torch.no_grad():
        distilled = torch.cat([exact_forward_from(staged, state, select, ratio, problem.reduction)
                               for state in chunks])
    print(f"[distil] the scorer's most likely sets on the train images: KL "
          f"{kl_from_unpruned(unpruned, distilled).mean():.4f}, "
          f"agreement {percent_equal(distilled.argmax(1), unpruned.argmax(1)):.2f}% "
          f"(greedy similarity {greedy_kl.mean():.4f}, {100 * greedy_agree.double().mean():.2f}%)", flush=True)

    print_validation(staged, config, problem, args.data_dir, args.val_images,
                     {"distilled scorer (trained on train)": select})


if __name__ == "__main__":
    run_from_command_line(main)
