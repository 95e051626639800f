"""Data: examples (`Example`), the built-in task generators, GSM8K and user files, validation splits,
and prompt encoding. `loading` holds `DataConfig` and `load_examples`."""

from .examples import Example, Examples
from .loading import DataConfig, fewshot_examples, load_examples

__all__ = ["DataConfig", "Example", "Examples", "fewshot_examples", "load_examples"]
