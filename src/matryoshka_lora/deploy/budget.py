"""Parameter budgets for per-layer ranks: `params:N`, `avg-rank:a` or `fraction:f`.

Layer l at rank k costs what export writes for it, lora_A (k, m_l) plus lora_B (n_l, k), so a
rank pattern costs sum_l k_l (m_l + n_l) adapter parameters. A budget names that size:
`params:N` (that many), `avg-rank:a` (the size of uniform rank a, a * sum_l (m_l + n_l)), or
`fraction:f` (f times the full-rank adapter, every layer at R). modules_to_save tensors do not
depend on ranks and are not counted.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

UNITS = ("params", "avg-rank", "fraction")
_EXAMPLES = "e.g. avg-rank:4, params:500000 or fraction:0.25"


@dataclass(frozen=True)
class Budget:
    """A parameter budget: `params` (adapter parameters), `avg-rank` (size of that uniform rank)
    or `fraction` (of the full-rank adapter, every layer at R)."""

    unit: str
    value: float

    def __post_init__(self):
        if self.unit not in UNITS:
            raise ValueError(f"Unknown budget unit {self.unit!r}. Available: {', '.join(UNITS)} ({_EXAMPLES}).")
        if isinstance(self.value, bool) or not isinstance(self.value, (int, float)) or not math.isfinite(self.value):
            raise ValueError(f"Budget {self.unit}:{self.value!r} needs a finite number ({_EXAMPLES}).")
        if self.value < 0:
            raise ValueError(f"Budget {self} is negative; a budget is a size, {_EXAMPLES}.")
        if self.unit == "params" and self.value != int(self.value):
            raise ValueError(f"Budget {self} must be a whole number of parameters, e.g. params:{int(self.value)}.")

    def __str__(self) -> str:
        return f"{self.unit}:{int(self.value) if self.unit == 'params' else f'{self.value:g}'}"

    def to_params(self, unit_params: int, r: int) -> int:
        """The budget in parameters, given `unit_params` = sum_l (m_l + n_l) (the size of uniform rank 1)."""
        if self.unit == "params":
            return int(self.value)
        scale = unit_params * (r if self.unit == "fraction" else 1)
        return int(math.floor(self.value * scale + 1e-6))  # 1e-6: avg-rank:4 is exactly 4 * unit_params


def parse_budget(spec: str | Budget) -> Budget:
    """Read a budget: `params:N`, `avg-rank:A` or `fraction:F` (e.g. `avg-rank:4`).

    Raises:
        ValueError: no unit, an unknown unit, a value that is not a number, or a negative one.
    """
    if isinstance(spec, Budget):
        return spec
    if not isinstance(spec, str):
        raise ValueError(f"budget={spec!r} has no unit; pass a string such as 'avg-rank:{spec}' or "
                         f"'params:{spec}', or Budget(unit, value) ({_EXAMPLES}).")
    unit, sep, value = spec.strip().partition(":")
    if not sep or not value.strip():
        raise ValueError(f"Budget {spec!r} must look like UNIT:VALUE ({_EXAMPLES}).")
    unit = unit.strip().lower().replace("_", "-")
    if unit not in UNITS:
        raise ValueError(f"Unknown budget unit {unit!r} in {spec!r}. Available: {', '.join(UNITS)} ({_EXAMPLES}).")
    try:
        number = float(value)
    except ValueError:
        raise ValueError(f"Budget {spec!r}: {value.strip()!r} is not a number ({_EXAMPLES}).") from None
    return Budget(unit, int(number) if unit == "params" and number == int(number) else number)


def parse_budgets(specs: str | Budget | Sequence[str | Budget]) -> list[Budget]:
    """Several budgets: a list, or one comma-separated string (`avg-rank:2,avg-rank:4`)."""
    if isinstance(specs, str):
        specs = [s for s in specs.split(",") if s.strip()]
    elif isinstance(specs, Budget):
        specs = [specs]
    budgets = [parse_budget(s) for s in specs]
    if not budgets:
        raise ValueError(f"No budget given; pass at least one ({_EXAMPLES}).")
    return budgets
