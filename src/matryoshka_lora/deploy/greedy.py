"""The greedy path of per-layer ranks: one walk gives the allocation of every budget.

Every layer starts at its smallest allowed rank (min(S); 0, the adapter switched off, with
`allow_off=True`). Each step raises the layer whose next rank has the largest gain per added
parameter; the path stops before the first step that would exceed the budget, and what is left
of the budget is filled with the best steps that still fit. Budgets are taken in ascending
order along the same path, so `allocation.allocation_curve` walks it once for all of them.
The gain of a move comes from a rule's `score` (calibration.py, spectrum.py).
"""

from __future__ import annotations

import math

import torch


class Greedy:
    """Walks the greedy path; `at(budget)` returns the allocation of a budget (budgets ascending).

    `score(pattern)` gives the gain of every layer's every move at the ranks `pattern`, (L, C-1),
    and the calibration loss it measured (None if it measured none). It is called when the first
    move is needed and again each time the adapter has grown by `refresh` (never with refresh=inf:
    a fixed table). With `positive_only`, moves that gain nothing are never taken.
    """

    def __init__(self, names: list[str], sizes: torch.Tensor, choices: list[int], score, refresh: float, bar,
                 positive_only: bool = False):
        self.names, self.sizes, self.choices, self.score = names, sizes, choices, score  # sizes (L,): m_l + n_l
        self.refresh, self.bar, self.positive_only = refresh, bar, positive_only
        ks = torch.tensor(choices, dtype=torch.float64)
        self.cost = self.sizes[:, None] * (ks[1:] - ks[:-1])[None, :]  # (L, C-1) parameters each move adds
        self.idx = torch.zeros(len(self.names), dtype=torch.long)  # index into choices, per layer
        self.params = float(choices[0] * self.sizes.sum())
        self.estimated_gain = 0.0
        self.refreshes: list[dict] = []
        self.gain = None  # (L, C-1) estimated loss drop of each move; scored when first needed

    def pattern(self, idx: torch.Tensor | None = None) -> dict[str, int]:
        idx = self.idx if idx is None else idx
        return {name: self.choices[i] for name, i in zip(self.names, idx.tolist())}

    def _score(self) -> None:
        """Recompute the gains of every layer's next move at the current ranks."""
        self.gain, loss = self.score(self.pattern())
        self.scored_at = self.params
        if loss is not None:
            self.refreshes.append({"params": int(self.params), "calibration_loss": loss})
            if self.bar is not None:
                self.bar.set_postfix(gradient_passes=len(self.refreshes), loss=f"{loss:.4f}")

    def _best(self, idx: torch.Tensor, room: float | None) -> int | None:
        """The layer whose next move has the best gain per parameter (among those that fit in `room`)."""
        open_ = idx < len(self.choices) - 1
        rows = torch.arange(len(idx))
        col = idx.clamp(max=len(self.choices) - 2)
        cost = self.cost[rows, col]
        ok = open_ if room is None else open_ & (cost <= room + 1e-9)
        if self.positive_only:
            ok &= self.gain[rows, col] > 0
        if not bool(ok.any()):
            return None
        ratio = torch.where(ok, self.gain[rows, col] / cost, torch.tensor(-math.inf, dtype=torch.float64))
        return int(torch.argmax(ratio))

    def at(self, budget: float) -> tuple[dict[str, int], float, float]:
        """Follow the path while the next move fits, then fill the rest; (pattern, params, estimated gain)."""
        open_ = self.idx < len(self.choices) - 1
        col = self.idx.clamp(max=len(self.choices) - 2)
        if not bool((open_ & (self.cost[torch.arange(len(col)), col] <= budget - self.params + 1e-9)).any()):
            return self.pattern(), self.params, self.estimated_gain  # no move fits: no gradients needed
        if self.gain is None:
            self._score()
        while True:
            layer = self._best(self.idx, None)
            if layer is None:
                break
            col = int(self.idx[layer])
            cost = float(self.cost[layer, col])
            if self.params + cost > budget + 1e-9:
                break
            self.idx[layer] += 1
            self.params += cost
            self.estimated_gain += float(self.gain[layer, col])
            if self.bar is not None:
                self.bar.update(int(cost))
            unit = float(self.sizes.sum())
            if self.params - self.scored_at >= self.refresh * max(self.scored_at, unit):
                self._score()
        idx, params, gain = self.idx.clone(), self.params, self.estimated_gain
        while (layer := self._best(idx, budget - params)) is not None:  # fill with the moves that still fit
            col = int(idx[layer])
            idx[layer] += 1
            params += float(self.cost[layer, col])
            gain += float(self.gain[layer, col])
        return self.pattern(idx), params, gain
