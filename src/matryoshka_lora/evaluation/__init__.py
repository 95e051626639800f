"""Evaluation: answer extraction (lm-eval gsm8k rules) and, later, rank-sweep evaluators."""

from .extract import extract, extract_flexible, extract_strict, is_correct, normalize

__all__ = ["extract", "extract_flexible", "extract_strict", "is_correct", "normalize"]
