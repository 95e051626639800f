"""Benchmarks: MatryoshkaLoRA against plain PEFT LoRA (run `make bench`; see benchmarks/common.py)."""
