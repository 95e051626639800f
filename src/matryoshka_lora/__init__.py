"""matryoshka-lora: train one LoRA adapter whose every rank prefix is a usable adapter."""

from .allocation import allocate_ranks, allocation_curve
from .allocation_result import Allocation, AllocationCurve
from .budget import Budget, parse_budget
from .config import MatryoshkaConfig
from .data import DataConfig, fewshot_examples, load_examples
from .evaluation.extract import extract_flexible, extract_strict, is_correct
from .evaluation.harness import HarnessConfig, harness_eval, harness_sweep
from .examples import Example
from .export import export_rank, rank_footprint
from .merge import merge_rank, merge_to_dir, unmerge
from .metrics import aurac, log_aurac
from .model import draw_rank, fold_p, get_controller, get_matryoshka_model, set_rank, set_row_ranks
from .prompts import build_prompt, encode_examples, encode_for_training, make_collator, stop_strings
from .recommend import recommend_rank
from .saving import fold_adapter, load_matryoshka_model, save_matryoshka
from .svd import svd_adapter, svd_order
from .weighting import default_ranks, prefix_weights, rank_scale, rank_weights

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
