"""`MatryoshkaConfig`: the rank schedule plus the LoRA fields users know from PEFT."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .files import read_json
from .weighting import check_schedule, default_ranks

CONFIG_NAME = "matryoshka_config.json"
INITS = ("peft", "paper")
DYLORA_DRAWS = ("step", "micro_batch")
MULTIRANK_ROWS = ("stack", "split")


@dataclass
class MatryoshkaConfig:
    """How to train a nested LoRA adapter. Every method is a choice of the vector P (SPEC Eq. 7)."""

    r: int = field(default=32, metadata={"help": "Maximum rank R: the size of the LoRA bottleneck that is trained."})
    ranks: list[int] | None = field(
        default=None,
        metadata={"help": "Rank set S trained (and evaluated) as nested prefixes. Default: powers of two up to r, plus r."},
    )
    method: str = field(
        default="multirank",
        metadata={"help": "multirank (the default, study v2's winner: rank R and ranks drawn from S trained in one "
                          "step, at LoRA's compute by default; see multirank_rows) | matryoshka (fixed P, "
                          "Algorithm 1: the paper's method) | lora (plain LoRA) | dylora (one random rank per "
                          "step) | custom (your weights)."},
    )
    scaling: str = field(
        default="none",
        metadata={"help": "Per-rank scale s_q: none (1) | rank (1/q) | sqrt (1/sqrt(q)). 'rank' and 'sqrt' need ~9x / ~3x larger learning rates."},
    )
    alpha: float = field(default=1.0, metadata={"help": "Constant multiplier on every rank scale s_q."})
    weights: dict[int, float] | None = field(
        default=None,
        metadata={"help": "method=custom only: non-negative weight per rank, {rank: weight}; P = sum_q w_q s_q P_q."},
    )
    ranks_per_step: int | None = field(
        default=None,
        metadata={"help": "multirank only: train this many ranks per step, the largest rank in S plus ones drawn at "
                          "random from the rest (the same on every process). Default: 2 with split rows (study v2's "
                          "winner), all of S with stacked rows (the exact objective)."},
    )
    multirank_rows: str | None = field(
        default=None,
        metadata={"help": "multirank only: split (the default: the batch's rows dealt out over the step's ranks, one "
                          "rank per row, at the compute of one LoRA step; with 2 ranks per step, half the rows at "
                          "rank R and half at one rank drawn from the rest) | stack (every row at every rank of the "
                          "step: the exact mean of the rank losses at ranks_per_step times the compute)."},
    )
    seed: int = field(default=0, metadata={"help": "Seed for the DyLoRA rank draws (a pure function of the seed and the step, "
                                                   "so every process draws the same rank)."})
    dylora_draw: str = field(
        default="step",
        metadata={"help": "dylora only (other methods ignore it): when the rank is redrawn. step: one rank per optimizer "
                          "step, shared by all its micro-batches (SPEC Eq. 2) | micro_batch: one rank per micro-batch, "
                          "as the official code draws inside compute_loss (with gradient_accumulation_steps > 1 one "
                          "update then mixes ranks). Either way the draw is a pure function of (seed, step, "
                          "micro-batch index), so data-parallel processes agree and a resumed run repeats the draws."},
    )
    target_modules: list[str] | str = field(
        default="all-linear",
        metadata={"help": "Modules to adapt, as in PEFT: 'all-linear', a list of names like ['q_proj','v_proj'], or a regex."},
    )
    init: str = field(
        default="peft",
        metadata={"help": "Initialisation of lora_A (B starts at 0 either way): peft (U(+-1/sqrt(in)), PEFT's "
                          "default) | paper (U(+-1/sqrt(R)), the official MatryoshkaLoRA code; its learning-rate "
                          "grids assume this scale)."},
    )
    lora_dropout: float = field(default=0.0, metadata={"help": "Dropout on the LoRA input, as in PEFT."})
    modules_to_save: list[str] | None = field(
        default=None, metadata={"help": "Extra modules trained in full and saved with the adapter, as in PEFT (e.g. ['lm_head'])."}
    )

    folded_from: str | None = field(
        default=None,
        metadata={"help": "Set by fold_p(): the method whose training P was baked into lora_A. Rank k then runs "
                          "A_k diag(P_k) B_k, the prefix of the trained A diag(P) B, in set_rank, export and merge."},
    )

    svd_from: str | None = field(
        default=None,
        metadata={"help": "Set by svd_order()/svd_adapter(): the adapter whose full-rank delta was re-factored by SVD "
                          "(its method, or 'peft-lora'); rank k is then the best rank-k approximation of that delta."},
    )

    def __post_init__(self):
        if self.ranks is None and isinstance(self.r, int) and self.r >= 1:
            self.ranks = default_ranks(self.r)
        if self.ranks is not None:
            self.ranks = sorted(self.ranks) if all(isinstance(q, int) for q in self.ranks) else list(self.ranks)
        if self.weights is not None and isinstance(self.weights, dict):
            self.weights = {int(q): float(w) for q, w in self.weights.items()}
        problems = []
        try:
            check_schedule(self.r, self.ranks, self.method, self.scaling, self.alpha, self.weights,
                           k=self.ranks[0] if self.method == "dylora" and self.ranks else None)
        except ValueError as e:
            problems.append(str(e).split("\n", 1)[1])
        if self.init not in INITS:
            problems.append(f"  - Unknown init {self.init!r}. Available: {', '.join(INITS)}.")
        if self.dylora_draw not in DYLORA_DRAWS:
            problems.append(f"  - Unknown dylora_draw {self.dylora_draw!r}. Available: {', '.join(DYLORA_DRAWS)}.")
        if not (isinstance(self.lora_dropout, (int, float)) and 0.0 <= self.lora_dropout < 1.0):
            problems.append(f"  - lora_dropout={self.lora_dropout!r} must be in [0, 1).")
        if self.ranks_per_step is not None:
            n = len(self.ranks) if isinstance(self.ranks, list) else None
            if self.method != "multirank":
                problems.append(f"  - ranks_per_step={self.ranks_per_step!r} is for method='multirank' only; "
                                f"remove it or set method='multirank'.")
            elif not isinstance(self.ranks_per_step, int) or not 1 <= self.ranks_per_step <= (n or 1):
                problems.append(f"  - ranks_per_step={self.ranks_per_step!r} must be an integer from 1 to |S|={n}.")
        if self.multirank_rows is not None and self.multirank_rows not in MULTIRANK_ROWS:
            problems.append(f"  - Unknown multirank_rows {self.multirank_rows!r}. "
                            f"Available: {', '.join(MULTIRANK_ROWS)}.")
        elif self.multirank_rows not in (None, "stack") and self.method != "multirank":  # stack: older configs
            problems.append(f"  - multirank_rows={self.multirank_rows!r} is for method='multirank' only; remove it or "
                            "set method='multirank'.")
        if not isinstance(self.seed, int):
            problems.append(f"  - seed={self.seed!r} must be an integer.")
        t = self.target_modules
        if not (isinstance(t, str) and t) and not (isinstance(t, (list, tuple)) and t and all(isinstance(x, str) and x for x in t)):
            problems.append(f"  - target_modules={t!r} must be 'all-linear', a regex, or a list of module names.")
        m = self.modules_to_save
        if m is not None and not (isinstance(m, (list, tuple)) and all(isinstance(x, str) and x for x in m)):
            problems.append(f"  - modules_to_save={m!r} must be a list of module names, or None.")
        if self.folded_from is not None and not isinstance(self.folded_from, str):
            problems.append(f"  - folded_from={self.folded_from!r} must be a method name, or None.")
        if problems:
            raise ValueError("Invalid MatryoshkaConfig:\n" + "\n".join(problems))

    def multirank_plan(self) -> tuple[str, int]:
        """multirank: (rows, ranks per step) with the defaults filled in: split rows over 2 ranks per step
        (study v2's winner), or all of S when rows are stacked (the exact objective). Unset fields stay None
        in the config, so switching `method` leaves nothing behind."""
        rows = self.multirank_rows or "split"
        return rows, self.ranks_per_step or (min(2, len(self.ranks)) if rows == "split" else len(self.ranks))

    def label(self) -> str:
        """This adapter's row name in tables: its method and how it was re-ordered, e.g. dylora+svd."""
        if self.svd_from:
            return f"{self.svd_from}+svd"
        return f"{self.folded_from}+fold" if self.folded_from else self.method

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        if d["weights"] is not None:
            d["weights"] = {str(q): w for q, w in d["weights"].items()}  # JSON keys are strings
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> MatryoshkaConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"Unknown MatryoshkaConfig keys {unknown}. Valid keys: {', '.join(sorted(known))}.")
        return cls(**d)

    def save(self, directory: str | Path) -> Path:
        path = Path(directory) / CONFIG_NAME
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return path

    @classmethod
    def load(cls, directory: str | Path) -> MatryoshkaConfig:
        path = Path(directory) / CONFIG_NAME
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: {directory} is not a matryoshka-lora adapter directory.")
        data = read_json(path, "re-save the adapter or restore the file (a JSON object with the rank schedule)")
        try:
            return cls.from_dict(data)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{path} is invalid: {e}") from e
