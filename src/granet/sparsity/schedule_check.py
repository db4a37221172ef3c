"""Say what a schedule will actually do in a run of ``total_steps`` optimizer steps.

A schedule that looks gradual in the config can degenerate on a short run: with ΔT = 1000 and 50
steps, pruning still happens once, at tf (the schedule always prunes at tf so the final density is
exact), which is one-shot pruning, and regrowth never happens. These messages state the outcome
and the setting that gives the intended behaviour.
"""
from __future__ import annotations

from typing import Optional

from .schedules import DropFractionSchedule, PruningSchedule

#: Fewer pruning events than this make the "gradual" schedule coarse enough to mention.
GRADUAL_MIN_EVENTS = 2


def prune_steps(schedule: PruningSchedule, total_steps: Optional[int] = None) -> list[int]:
    """The optimizer steps at which ``schedule`` prunes (up to ``total_steps`` when given)."""
    last = schedule.end if total_steps is None else min(schedule.end, total_steps)
    first = schedule.start + 1
    steps = list(range(first + (-first) % schedule.interval, last + 1, schedule.interval))
    if schedule.end <= last and (not steps or steps[-1] != schedule.end):
        steps.append(schedule.end)
    return steps


def regrowth_steps(schedule: DropFractionSchedule, total_steps: int) -> int:
    """How many drop-and-regrow updates ``schedule`` makes in ``total_steps`` steps."""
    last = min(schedule.end - 1, total_steps)
    first = max(schedule.first_update, 1)
    if schedule.initial <= 0 or last < first:
        return 0
    return last // schedule.interval - (first - 1) // schedule.interval


def schedule_warnings(
    pruning: Optional[PruningSchedule], regrowth: Optional[DropFractionSchedule], total_steps: Optional[int]
) -> list[str]:
    """Messages for schedules that do not do in ``total_steps`` what their settings suggest.

    Args:
        pruning: the pruning schedule (``None`` when the method does not prune).
        regrowth: the drop-and-regrow schedule (``None`` when the method does not regrow).
        total_steps: optimizer steps of the run (``None``: unknown, nothing is said).

    Returns:
        Zero or more one-line messages.
    """
    if total_steps is None:
        return []
    messages = []
    if pruning is not None and pruning.final_density < pruning.init_density:
        events = prune_steps(pruning, total_steps)
        window = pruning.end - pruning.start
        # The largest ΔT that still prunes at GRADUAL_MIN_EVENTS multiples of ΔT inside (t0, tf].
        suggest = max(1, window // GRADUAL_MIN_EVENTS)
        # A one-step window is one-shot by design (the scored methods: snip, grasp, synflow).
        if len(events) == 1 and window > 1:
            messages.append(
                f"pruning happens once, at step {events[0]} (update_interval={pruning.interval}, pruning window "
                f"{pruning.start}..{pruning.end}): this is one-shot pruning; set update_interval <= {suggest} "
                f"for gradual pruning"
            )
    if regrowth is not None and regrowth.initial > 0:
        if regrowth_steps(regrowth, total_steps) == 0:
            messages.append(
                f"no drop-and-regrow update happens in {total_steps} steps (update_interval={regrowth.interval}, "
                f"regrowth window {regrowth.first_update}..{regrowth.end}); set update_interval <= "
                f"{max(1, min(regrowth.end - 1, total_steps))} for at least one"
            )
    return messages
