"""benchmarks/search_distil.py: the swaps it searches are the ones at the cut, each is scored by the exact pruned
forward it stands for, and its loss ranks a target swap's tokens the target's way."""

import torch

from benchmarks.content_headroom import ContentScorer, greedy_keep_rank, kl_from_unpruned
from benchmarks.search_distil import (
    GREEDY,
    distil,
    pair_loss,
    recording_greedy_path,
    search,
    swap_candidates,
    swap_kl,
    swap_targets,
)
from envs.vit.pruned_forward import exact_forward_from, initial_state, prune_step
from envs.vit.token_ops import highest, tokens_to_keep


def test_the_candidates_are_the_kept_and_removed_tokens_nearest_the_cut():
    rank = torch.tensor([[0.5, 0.1, 0.9, 0.3, 0.7, 0.0]])
    live = torch.tensor([[True, True, True, True, True, False]])
    out_rows, in_rows = swap_candidates(rank, live, k=3, window=2)
    assert out_rows.tolist() == [[0, 4]]  # kept: 2, 4, 0; the lowest kept first
    assert in_rows.tolist() == [[3, 1]]  # removed: 3, 1 (row 5 is dead); the highest first


def test_the_recorded_path_is_greedy_similarity(tiny_staged):
    staged, _ = tiny_staged
    state = initial_state(staged, torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(2)))
    record, path = recording_greedy_path()
    with torch.no_grad():
        recorded = exact_forward_from(staged, state, record, 0.5, "merge")
        greedy = exact_forward_from(staged, state, GREEDY, 0.5, "merge")
    torch.testing.assert_close(recorded, greedy)
    assert [state.stage for state, _ in path] == list(range(len(staged.prune_points)))
    assert all(rank.shape == state.live.shape for state, rank in path)


def test_each_swap_is_scored_by_its_own_exact_pruned_forward(tiny_staged):
    staged, _ = tiny_staged
    with torch.no_grad():
        state = initial_state(staged, torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0)))
        unpruned = staged.forward_from(state.tokens, 1).log_softmax(-1)
        rank = greedy_keep_rank(state.patches, state.live)
        k = tokens_to_keep(state.live.shape[1], 0.5)
        swaps = swap_candidates(rank, state.live, k, window=2)
        kl, agree = swap_kl(staged, state, rank, k, swaps, unpruned, 0.5, "merge")
        assert kl.shape == agree.shape == (3, 2, 2)
        for a in range(2):
            for b in range(2):
                keep = highest(rank, k, state.live)
                keep[torch.arange(3), swaps[0][:, a]] = False
                keep[torch.arange(3), swaps[1][:, b]] = True
                assert (keep.sum(dim=1) == k).all()
                logits = exact_forward_from(staged, prune_step(staged, state, keep, "merge"), GREEDY, 0.5, "merge")
                torch.testing.assert_close(kl[:, a, b], kl_from_unpruned(unpruned, logits))
                assert agree[:, a, b].tolist() == (logits.argmax(1) == unpruned.argmax(1)).tolist()
        greedy = exact_forward_from(staged, state, GREEDY, 0.5, "merge")
    assert not torch.allclose(kl, kl_from_unpruned(unpruned, greedy)[:, None, None].expand_as(kl))  # sets differ


def test_the_loss_ranks_a_target_swap_in_and_every_other_pair_out():
    scores = torch.zeros(1, 4, requires_grad=True)
    swaps = (torch.tensor([[0, 1]]), torch.tensor([[2, 3]]))  # out: rows 0, 1; in: rows 2, 3
    targets = torch.zeros(1, 2, 2)
    targets[0, 0, 1] = 1  # swap row 0 out, row 3 in
    pair_loss(scores, swaps, targets, temperature=0.1, positive_weight=8.0).backward()
    gradient = scores.grad[0]
    assert gradient[3] < 0 < gradient[0]  # descent raises row 3 and lowers row 0
    assert gradient[2] > 0 > gradient[1]  # row 2 stays out and row 1 stays in


def test_a_cut_with_fewer_tokens_than_the_window_on_one_side_is_searched_and_distilled(tiny_staged):
    """At r = 0.7 the last pruning point keeps 2 of 6 tokens: 2 candidates out, 3 in."""
    staged, _ = tiny_staged
    with torch.no_grad():
        state = initial_state(staged, torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1)))
        unpruned = staged.forward_from(state.tokens, 1).log_softmax(-1)
    found, greedy_kl, _ = search(staged, [state], unpruned, 0.7, "merge", window=3)
    assert [point.kl.shape for point in found] == [(4, 3, 3), (4, 3, 3), (4, 2, 3)]
    targets = [swap_targets(point, greedy_kl, min_gain=-1.0) for point in found]  # every image has a target
    assert all(target.flatten(1).sum(dim=1).eq(1).all() for target in targets)
    torch.manual_seed(0)
    scorer = distil(staged, found, targets, 0.7, epochs=1, batch_size=2, lr=1e-3, hidden=8, temperature=0.02,
                    positive_weight=8.0)
    torch.manual_seed(0)
    untrained = ContentScorer(staged.embed_dim, 8).state_dict()  # the scorer distil started from
    assert [name for name, value in scorer.state_dict().items() if torch.equal(value, untrained[name])] == []
