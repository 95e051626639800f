"""Putting P onto a PEFT LoRA model and choosing the rank it runs at.

One `RankController` per model holds the rank schedule and the current mode:

- training (`set_rank(model, None)`): every layer uses the method's P (Eq. 7);
- rank k (`set_rank(model, k)`): every layer uses `s_k P_k`, the plain rank-k prefix;
- per layer (`set_rank(model, {pattern: k})`): each layer uses its own prefix;
- per row (`set_row_ranks(model, [k_1, ..., k_B])`): row b of the batch uses `s_{k_b} P_{k_b}`,
  a (B, R) mask applied to the one bottleneck (mixed-rank batches).

Rank 0 zeroes the adapter output, which gives the base model exactly. Vectors come from
`weighting.py` and are cached per (mode, device, dtype), so a training step costs one
elementwise multiply per layer and no allocation.
"""

from __future__ import annotations

import dataclasses
import math
import random
from collections.abc import Mapping, Sequence

import torch

from . import fused as fused_path
from . import peft_seam
from .config import MatryoshkaConfig
from .ranks import layer_ranks
from .weighting import NO_FIXED_P, fold_factors, prefix_weights, rank_weights


class RankController:
    """The shared rank state of one model; each adapted layer asks it for its vector."""

    def __init__(self, config: MatryoshkaConfig, layer_names: Sequence[str]):
        self.config = config
        self.layer_names = list(layer_names)
        self.training_k: int | None = None  # DyLoRA's current draw
        self._draws = 0
        self.micro_batch = 0  # index of the running micro-batch within its optimizer step (MatryoshkaCallback)
        self._mode: object = None  # None | int | dict[name, int] | torch.Tensor of row ranks
        self._cache: dict[tuple, tuple[torch.Tensor, bool]] = {}
        self.fused = False  # layers run `fused.fused_forward` (set by `attach` / `set_fused`)
        self.hook_ids: set[int] = set()  # handles of our P hooks on lora_A

    # -- vectors ------------------------------------------------------------------------------
    def _base_vector(self, key) -> torch.Tensor:
        c = self.config
        if key[0] == "train":
            if c.method == "dylora":
                return rank_weights(c.r, c.ranks, "dylora", c.scaling, c.alpha, k=key[1])
            return rank_weights(c.r, c.ranks, c.method, c.scaling, c.alpha, c.weights)
        if key[0] == "rank":
            return prefix_weights(c.r, key[1], c.scaling, c.alpha)
        # ("rows", tensor_id): (B, R), one prefix per row
        rows = self._mode
        table = torch.stack([prefix_weights(c.r, k, c.scaling, c.alpha) for k in range(c.r + 1)])  # (R+1, R)
        return table[rows.cpu()]

    def _cached(self, key, like: torch.Tensor) -> tuple[torch.Tensor, bool]:
        full = (key, like.device, like.dtype)
        entry = self._cache.get(full)
        if entry is None:
            # a normal tensor even when first needed under inference_mode, so a later backward can save it
            with torch.inference_mode(False):
                vec = self._base_vector(key).to(device=like.device, dtype=like.dtype)
            entry = self._cache[full] = (vec, bool((vec == 1).all()))
        return entry

    def _lookup(self, name: str, like: torch.Tensor) -> tuple[torch.Tensor, bool]:
        mode = self._mode
        if mode is None:
            if self.config.method == "dylora" and self.training_k is None:
                self.draw()
            return self._cached(("train", self.training_k), like)
        if isinstance(mode, int):
            return self._cached(("rank", mode), like)
        if isinstance(mode, dict):
            return self._cached(("rank", mode[name]), like)
        vec, ones = self._cached(("rows", id(mode)), like)  # (B, R)
        if like.shape[0] != vec.shape[0]:
            raise ValueError(
                f"Row ranks were set for a batch of {vec.shape[0]} but the model got a batch of {like.shape[0]}; "
                "pass one rank per sequence in the batch."
            )
        return vec.view(vec.shape[0], *([1] * (like.dim() - 2)), vec.shape[1]), ones

    def vector(self, name: str, like: torch.Tensor) -> torch.Tensor:
        """The P to multiply into `like` (lora_A's output, shape (..., R)) for layer `name`."""
        return self._lookup(name, like)[0]

    def scale(self, name: str, like: torch.Tensor) -> torch.Tensor | None:
        """`vector(name, like)`, or None where it is all ones (the multiply can be skipped)."""
        vec, ones = self._lookup(name, like)
        return None if ones else vec

    # -- modes --------------------------------------------------------------------------------
    @property
    def mode(self):
        return self._mode

    def set_mode(self, mode) -> None:
        if isinstance(self._mode, torch.Tensor) or isinstance(mode, torch.Tensor):
            self._cache = {k: v for k, v in self._cache.items() if k[0][0] != "rows"}
        self._mode = mode

    def draw(self, step: int | None = None, micro_batch: int | None = None) -> int | None:
        """DyLoRA: draw the rank for optimizer step `step` (one draw for the whole model).

        With `micro_batch` (config.dylora_draw = "micro_batch") the draw is for that micro-batch
        of the step instead. The draw is a pure function of (seed, step[, micro_batch]), so every
        data-parallel process draws the same k and a resumed run repeats the draws of the run it
        continues.
        """
        if self.config.method != "dylora":
            return None
        if step is None:
            step = self._draws
        self._draws = step + 1
        key = f"{self.config.seed}:{step}" if micro_batch is None else f"{self.config.seed}:{step}:{micro_batch}"
        self.training_k = random.Random(key).choice(self.config.ranks)
        return self.training_k

    def step_ranks(self, step: int) -> list[int]:
        """multirank: the ranks trained at optimizer step `step`: with n ranks per step (multirank_plan),
        the largest rank plus n - 1 others drawn as a pure function of (seed, step); all of S if n = |S|."""
        c = self.config
        n = c.multirank_plan()[1]
        if n >= len(c.ranks):
            return list(c.ranks)
        top = max(c.ranks)
        rest = [q for q in c.ranks if q != top]
        return sorted(random.Random(f"{c.seed}:multirank:{step}").sample(rest, n - 1) + [top])

    def split_rows(self, step: int, micro_batch: int, batch: int) -> list[int]:
        """multirank with split rows: the rank of each of the `batch` rows of one micro-batch.

        The step's ranks are dealt out in turn from an offset drawn as a pure function of (seed, step,
        micro_batch), so each rank gets batch // n or one more rows and every process deals alike.
        """
        ranks = self.step_ranks(step)
        offset = random.Random(f"{self.config.seed}:rows:{step}:{micro_batch}").randrange(len(ranks))
        return [ranks[(offset + i) % len(ranks)] for i in range(batch)]

    def __call__(self, name: str):
        """A forward hook for layer `name` that scales the bottleneck by P."""

        def hook(module, inputs, output):
            return output * self.vector(name, output)

        return hook


def get_matryoshka_model(model: torch.nn.Module, config: MatryoshkaConfig, fused: bool = True):
    """Wrap a Hugging Face model with nested LoRA adapters (any model PEFT LoRA supports).

    Args:
        model: A transformers model (nn.Linear layers, or GPT-2 style Conv1D).
        config: The rank schedule and LoRA targets.
        fused: Run the fused LoRA forward (`fused.py`: the same outputs and gradients as PEFT's,
            with fewer operations) wherever it is exact; False runs PEFT's forward everywhere.

    Returns:
        A `peft.PeftModel` whose LoRA layers run Eq. 7; only the adapter is trainable.
    """
    peft_model = peft_seam.wrap(model, peft_seam.lora_config(config.r, config.target_modules,
                                                              config.lora_dropout, config.modules_to_save))
    if config.init == "paper":
        init_paper(peft_model, config.r)
    attach(peft_model, config, fused)
    return peft_model


@torch.no_grad()
def init_paper(model: torch.nn.Module, r: int) -> None:
    """The official code's init: kaiming_uniform_(a=sqrt(5)) on an (in, R) tensor, i.e. A ~ U(+-1/sqrt(R)).

    PEFT runs the same call on its (R, in) layout, which gives U(+-1/sqrt(in)); we redraw A in
    place with the official bound (B stays 0, so the adapter still starts as the base model).
    """
    bound = 1.0 / math.sqrt(r)
    for _, layer in peft_seam.lora_layers(model):
        A, _ = peft_seam.factors(layer)  # (R, m)
        A.uniform_(-bound, bound)


def attach(peft_model: torch.nn.Module, config: MatryoshkaConfig, fused: bool = True) -> RankController:
    """Install the rank controller on an existing PEFT LoRA model (used by get/load)."""
    layers = list(peft_seam.lora_layers(peft_model))
    if not layers:
        raise ValueError("No LoRA layers found; check target_modules (e.g. 'all-linear' or ['q_proj', 'v_proj']).")
    controller = RankController(config, [name for name, _ in layers])
    for name, layer in layers:
        peft_seam.set_unit_scaling(layer)
        controller.hook_ids.add(peft_seam.add_bottleneck_hook(layer, controller(name)).id)
        layer._mlora_controller = controller
    fused_path.install(layers)
    controller.fused = fused
    peft_model._mlora_controller = controller
    return controller


def set_fused(model: torch.nn.Module, fused: bool) -> None:
    """Run the fused LoRA forward (`fused.py`) where it is exact, or PEFT's own forward everywhere."""
    get_controller(model).fused = bool(fused)


def get_controller(model: torch.nn.Module) -> RankController:
    """Find the controller of a matryoshka model, also through DDP/Accelerate wrappers."""
    for candidate in (model, getattr(model, "module", None)):
        controller = getattr(candidate, "__dict__", {}).get("_mlora_controller")
        if controller is not None:
            return controller
    for module in model.modules():
        controller = module.__dict__.get("_mlora_controller")
        if controller is not None:
            return controller
    raise ValueError("This model has no matryoshka adapter; wrap it with get_matryoshka_model() or load_matryoshka_model().")


class _Restore:
    """Returned by the setters: usable as a plain call or as a context manager that restores the mode."""

    def __init__(self, controller: RankController, previous):
        self._controller, self._previous = controller, previous

    def __enter__(self):
        return self._controller

    def __exit__(self, *exc):
        self._controller.set_mode(self._previous)
        return False


def set_rank(model: torch.nn.Module, rank: int | Mapping[str, int] | None, default: int | None = None) -> _Restore:
    """Run the model at a rank prefix (SPEC "Inference at any rank").

    Args:
        model: A model from get_matryoshka_model / load_matryoshka_model.
        rank: k in 0..R for every layer (0 = base model); a dict {layer pattern: k}
            (patterns match like PEFT's rank_pattern) for per-layer ranks; or None to go
            back to the training weighting P.
        default: With a dict, the rank of layers no pattern matches (default: R).

    Returns:
        An object that also works as a context manager restoring the previous mode.

    Raises:
        ValueError: a rank outside 0..R or a pattern that matches no layer.
    """
    controller = get_controller(model)
    previous = controller.mode
    mode = None if rank is None else layer_ranks(controller.config.r, controller.layer_names, rank, default)
    controller.set_mode(mode)
    return _Restore(controller, previous)


def set_row_ranks(model: torch.nn.Module, ranks: Sequence[int] | torch.Tensor | None) -> _Restore:
    """Give each sequence of the next batches its own rank (one (B, R) mask on the bottleneck).

    Args:
        model: A matryoshka model.
        ranks: One rank in 0..R per batch row, length B; None goes back to training mode.
    """
    controller = get_controller(model)
    previous = controller.mode
    if ranks is None:
        controller.set_mode(None)
    else:
        rows = torch.as_tensor(list(ranks) if not isinstance(ranks, torch.Tensor) else ranks, dtype=torch.long)
        r = controller.config.r
        if rows.dim() != 1 or rows.numel() == 0 or bool(((rows < 0) | (rows > r)).any()):
            raise ValueError(f"Row ranks must be a non-empty 1-D list of ranks in 0..{r}; got {rows.tolist()}.")
        controller.set_mode(rows)
    return _Restore(controller, previous)


def draw_rank(model: torch.nn.Module, step: int | None = None, micro_batch: int | None = None) -> int | None:
    """DyLoRA: draw the rank of optimizer step `step` (or of its micro-batch `micro_batch`) for the
    whole model; returns it (None for other methods)."""
    return get_controller(model).draw(step, micro_batch)


@torch.no_grad()
def fold_p(model: torch.nn.Module) -> MatryoshkaConfig:
    """Bake the training vector P into lora_A ("fold P"): A <- diag(P) A in PEFT's (R, m) layout.

    Afterwards the adapter is a plain scale-1 LoRA (method "lora", s = 1): the training-mode
    output is unchanged (x A diag(P) B), and rank k runs `x W0 + x A_k diag(P_k) B_k`, the prefix
    of the trained product, instead of the paper's `s_k x A_k B_k`. set_rank, save, export and
    merge need nothing else, since they all apply the plain prefix rule to the folded weights.

    Returns:
        The new config (also stored on the controller; `folded_from` names the original method).

    Raises:
        ValueError: DyLoRA/multirank (no single trained P) or an adapter already folded.
    """
    controller = get_controller(model)
    p, folded = fold_plan(controller.config)
    for _, layer in peft_seam.lora_layers(model):
        A, _ = peft_seam.factors(layer)  # (R, m)
        A.copy_(fold_factors(A, p))
    controller.config = folded
    controller._cache.clear()
    return folded


def fold_plan(c: MatryoshkaConfig) -> tuple[torch.Tensor, MatryoshkaConfig]:
    """The training P to multiply into lora_A's rows, and the config of the folded adapter."""
    if c.folded_from is not None:
        raise ValueError(f"This adapter is already folded (from method {c.folded_from!r}).")
    if c.method in NO_FIXED_P:
        raise ValueError(f"method {c.method!r} trains each rank with its own s_k P_k, so there is no single P to fold; "
                         "evaluate it with set_rank as it is.")
    p = rank_weights(c.r, c.ranks, c.method, c.scaling, c.alpha, c.weights)  # (R,)
    return p, dataclasses.replace(c, method="lora", scaling="none", alpha=1.0, weights=None, folded_from=c.method)


def get_rank_config(model: torch.nn.Module) -> MatryoshkaConfig:
    return get_controller(model).config
