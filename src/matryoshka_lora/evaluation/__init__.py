"""Scoring nested adapters at every rank: built-in evaluators and the lm-evaluation-harness wrapper."""

from .extract import extract, extract_flexible, extract_strict, is_correct, normalize

__all__ = ["extract", "extract_flexible", "extract_strict", "is_correct", "normalize"]
