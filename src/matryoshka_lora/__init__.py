"""matryoshka-lora: train one LoRA adapter whose every rank prefix is a usable adapter."""

from .config import MatryoshkaConfig
from .export import export_rank, rank_footprint
from .merge import merge_rank, merge_to_dir, unmerge
from .metrics import aurac, log_aurac
from .model import draw_rank, get_controller, get_matryoshka_model, set_rank, set_row_ranks
from .recommend import recommend_rank
from .saving import load_matryoshka_model, save_matryoshka
from .weighting import default_ranks, prefix_weights, rank_scale, rank_weights

__version__ = "0.1.0"

__all__ = [
    "MatryoshkaConfig",
    "aurac",
    "default_ranks",
    "draw_rank",
    "export_rank",
    "get_controller",
    "get_matryoshka_model",
    "load_matryoshka_model",
    "log_aurac",
    "merge_rank",
    "merge_to_dir",
    "prefix_weights",
    "rank_footprint",
    "rank_scale",
    "rank_weights",
    "recommend_rank",
    "save_matryoshka",
    "set_rank",
    "set_row_ranks",
    "unmerge",
]
