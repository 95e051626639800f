"""Scoring nested adapters at every rank: the sweep, teacher-forced match, likelihood, generation,
the lm-evaluation-harness bridge, and the results schema (`report.py`). Answer extraction lives in
`data/answers.py`, next to the answer formats it reads."""
