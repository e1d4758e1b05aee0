"""Teacher health: a bad peer must never poison the students that read it.

Three guards, from cheapest to the one that needs judgment:
1. On load (the loader thread, codistill/teachers/loader.py check_usable): an export with non-finite
   weights, or tensors the model does not have, is refused like any corrupt file.
2. Per step (TeacherPool.probs, on the device, no host sync): a teacher whose probabilities are
   non-finite on this batch is left out of the average for this step.
3. Quality (``TeacherGuard``, here): each teacher's cross entropy on the student's own targets,
   -log q(y), is compared with the student's own cross entropy. When the teacher's perplexity
   exceeds the student's by more than ``max_ratio`` (``--teacher_max_ppl_ratio``) on average over
   the last ``window`` steps (``--teacher_guard_window``; a non-finite batch counts as infinitely
   worse), that peer is dropped: its teacher still runs, to be measured, but is not averaged in.
   A newer export of a dropped peer is on probation: it is used again once a full window shows it
   within the ratio. A peer that was never dropped is used as soon as it is swapped in.

The default ratio (3) sits well above what healthy stale peers show: on the main command
(measured, both groups), teachers K..2K steps behind the student peak at a 5-step mean ratio of
1.62 / 1.50 shortly after burn-in (steps 67-75, while the perplexity still falls fast; single
batches up to 1.67) and have a median of 1.11 / 1.14 over the run, while a peer with random
weights is orders of magnitude worse. The window (5 steps) keeps
one odd batch from dropping a teacher and limits what a bad one can do before it is caught.

Every rank of a group must use the same teachers: the group's leader decides from its own
batches and announces each (student, peer) state in the step's sync (codistill/comm.py); all
ranks apply the announced states from the next step on.
"""
from __future__ import annotations

import math
from collections import deque

USE, DROP = 1, 2  # announced states (0 in the sync = no announcement)


class TeacherGuard:
    def __init__(self, hosted: list[int], leaders: set[int], num_groups: int, max_ratio: float | None,
                 window: int, log=print):
        self.hosted, self.leaders, self.G = list(hosted), set(leaders), num_groups
        self.max_gap = math.log(max_ratio) if max_ratio else None
        self.window, self.log = window, log
        self.gaps: dict[tuple[int, int], deque] = {}
        self.state: dict[tuple[int, int], str] = {}    # leader's view: "ok" | "dropped" | "probation"
        self.agreed: dict[tuple[int, int], int] = {}   # what every rank of the group applies
        self.dropped_total: dict[int, int] = {g: 0 for g in hosted}
        self.last: dict[tuple[int, int], float] = {}   # the last window mean (for messages)

    @property
    def enabled(self) -> bool:
        return self.max_gap is not None

    def excluded(self, student: int, peer: int) -> bool:
        return self.agreed.get((student, peer)) == DROP

    def on_swap(self, peer: int) -> None:
        """A new export of ``peer`` is in: a dropped peer goes on probation."""
        for g in self.hosted:
            key = (g, peer)
            if self.state.get(key) == "dropped":
                self.state[key] = "probation"
            self.gaps.pop(key, None)

    def observe(self, student: int, student_ce: float, teacher_ce: dict[int, float],
                nonfinite: dict[int, bool]) -> None:
        """The leader's step: one observation per teacher that ran."""
        if not self.enabled or student not in self.leaders or not math.isfinite(student_ce):
            return
        for p, ce in teacher_ce.items():
            if p < 0:  # a fixed teacher (--teacher) is the user's choice, not a peer to judge
                continue
            key = (student, p)
            gap = math.inf if nonfinite.get(p) or not math.isfinite(ce) else ce - student_ce
            self.state.setdefault(key, "ok")
            q = self.gaps.setdefault(key, deque(maxlen=self.window))
            q.append(gap)
            if len(q) < self.window:
                continue
            mean = sum(q) / len(q)
            self.last[key] = mean
            state = self.state.get(key, "ok")
            if state == "ok" and mean > self.max_gap:
                self.state[key] = "dropped"
            elif state == "probation" and mean <= self.max_gap:
                self.state[key] = "ok"

    def proposals(self) -> dict[tuple[int, int], int]:
        """What this rank announces in the step's sync: the states of the groups it leads."""
        if not self.enabled:
            return {}
        return {key: DROP if st != "ok" else USE for key, st in self.state.items() if key[0] in self.leaders}

    def apply(self, announced: dict[tuple[int, int], int], steps: dict[int, int], step: int) -> None:
        """The announced states, for every rank; a change is said once on the console."""
        for key, st in announced.items():
            if key[0] not in self.hosted or self.agreed.get(key, USE) == st:
                self.agreed[key] = st
                continue
            g, p = key
            self.agreed[key] = st
            if g not in self.leaders:  # the leader says it; it has the numbers
                continue
            ratio = math.exp(self.last[key]) if math.isfinite(self.last.get(key, math.inf)) else math.inf
            where = f"g{p}@{steps.get(p, '?')}"
            if st == DROP:
                self.dropped_total[g] += 1
                self.log(f"WARNING: [group {g}] step {step}: teacher {where} dropped: its perplexity on this "
                         f"group's data is {ratio:.1f}x the student's over the last {self.window} steps "
                         f"(--teacher_max_ppl_ratio {math.exp(self.max_gap):g}); it is used again once a "
                         "newer export of that peer passes", force=True)
            else:
                self.log(f"[group {g}] step {step}: teacher {where} passes again ({ratio:.1f}x the student's "
                         "perplexity): back in use", force=True)

    def num_dropped(self, student: int) -> int:
        return sum(1 for (g, _), st in self.agreed.items() if g == student and st == DROP)

    def describe(self, student: int, steps: dict[int, int]) -> str:
        """The teachers of ``student`` and their last measured ratio, for messages."""
        parts = []
        for (g, p), mean in sorted(self.last.items()):
            if g == student:
                ratio = f"{math.exp(mean):.1f}x" if math.isfinite(mean) else "non-finite"
                parts.append(f"g{p}@{steps.get(p, '?')} (perplexity {ratio} the student's"
                             + (", dropped" if self.excluded(g, p) else "") + ")")
        return ", ".join(parts)
