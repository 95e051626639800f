"""Scoring nested adapters at every rank: built-in evaluators and the lm-evaluation-harness wrapper."""
