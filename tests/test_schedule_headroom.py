"""benchmarks/schedule_headroom.py's pure parts: the rows it runs, each within the reference's cost."""

from benchmarks.schedule_headroom import schedule_methods
from envs.vit.flops import exact_budget_schedule, image_gflops
from tests.test_flops import REFERENCE_SPEC as SPEC


def test_every_schedule_runs_each_selection_within_greedy_similaritys_cost_at_the_reference():
    schedules = [(3, 6, 9), (2, 5, 8), (1, 3, 5, 7, 9, 11)]
    rows = schedule_methods(SPEC, schedules, 0.7, "merge", ["similarity", "random"])
    target = image_gflops(SPEC, (3, 6, 9), exact_budget_schedule(64, 3, 0.7), "merge", "similarity").total
    assert [(points, method.selection) for points, method in rows] == [
        (points, selection) for points in schedules for selection in ("similarity", "random")] + [((3, 6, 9), "tome")]
    assert rows[0][1].budget == 0.7 and rows[-1][1].budget == 0.7
    for points, method in rows[2:-1]:
        kept = exact_budget_schedule(64, len(points), method.budget)
        assert image_gflops(SPEC, points, kept, "merge", "similarity").total <= target
        assert method.budget < 0.7  # more pruning points, each removing less

