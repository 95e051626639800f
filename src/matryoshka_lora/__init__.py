"""matryoshka-lora: train one LoRA adapter whose every rank prefix is a usable adapter."""

from .core.config import MatryoshkaConfig
from .core.metrics import aurac, log_aurac
from .core.model import draw_rank, fold_p, get_controller, get_matryoshka_model, set_rank, set_row_ranks
from .core.saving import fold_adapter, load_matryoshka_model, save_matryoshka
from .core.weighting import default_ranks, prefix_weights, rank_scale, rank_weights
from .data.answers import extract_flexible, extract_strict, is_correct
from .data.examples import Example
from .data.loading import DataConfig, fewshot_examples, load_examples
from .data.prompts import build_prompt, encode_examples, encode_for_training, make_collator, stop_strings
from .deploy.allocation import allocate_ranks, allocation_curve
from .deploy.allocation_result import Allocation, AllocationCurve
from .deploy.budget import Budget, parse_budget
from .deploy.export import export_rank, rank_footprint
from .deploy.merge import merge_rank, merge_to_dir, unmerge
from .deploy.recommend import recommend_rank
from .deploy.svd import svd_adapter, svd_order
from .evaluation.harness import HarnessConfig, harness_eval, harness_sweep

__version__ = "0.1.0"

__all__ = [
    "Allocation",
    "AllocationCurve",
    "Budget",
    "DataConfig",
    "Example",
    "HarnessConfig",
    "MatryoshkaConfig",
    "allocate_ranks",
    "allocation_curve",
    "aurac",
    "build_prompt",
    "default_ranks",
    "draw_rank",
    "encode_examples",
    "encode_for_training",
    "export_rank",
    "extract_flexible",
    "extract_strict",
    "fewshot_examples",
    "fold_adapter",
    "fold_p",
    "get_controller",
    "get_matryoshka_model",
    "harness_eval",
    "harness_sweep",
    "is_correct",
    "load_examples",
    "load_matryoshka_model",
    "log_aurac",
    "make_collator",
    "merge_rank",
    "merge_to_dir",
    "parse_budget",
    "prefix_weights",
    "rank_footprint",
    "rank_scale",
    "rank_weights",
    "recommend_rank",
    "save_matryoshka",
    "set_rank",
    "set_row_ranks",
    "stop_strings",
    "svd_adapter",
    "svd_order",
    "unmerge",
]
