import math

import pytest
import torch

from matryoshka_lora import default_ranks, prefix_weights, rank_weights

R3 = 1 / math.sqrt(2)
CASES = [
    # (kwargs, expected P)
    (dict(r=8, ranks=[1, 2, 4, 8]), [4, 3, 2, 2, 1, 1, 1, 1]),
    (dict(r=8, ranks=[1, 2, 4, 8], alpha=2.0), [8, 6, 4, 4, 2, 2, 2, 2]),
    (dict(r=4, ranks=[1, 2, 4], scaling="rank"), [1 + 1 / 2 + 1 / 4, 1 / 2 + 1 / 4, 1 / 4, 1 / 4]),
    (dict(r=4, ranks=[1, 2, 4], scaling="sqrt"), [1 + R3 + 0.5, R3 + 0.5, 0.5, 0.5]),
    (dict(r=6, ranks=[3, 5]), [2, 2, 2, 1, 1, 0]),  # not powers of two; r itself not in S
    (dict(r=8, ranks=[1, 2, 4, 8], method="lora"), [1] * 8),
    (dict(r=4, ranks=[1, 2, 4], method="lora", scaling="rank"), [0.25] * 4),
    (dict(r=4, ranks=[1, 2, 4], method="lora", scaling="sqrt", alpha=3.0), [1.5] * 4),
    (dict(r=8, ranks=[1, 2, 4, 8], method="dylora", k=2), [1, 1, 0, 0, 0, 0, 0, 0]),
    (dict(r=8, ranks=[1, 2, 4, 8], method="dylora", k=4, scaling="rank"), [0.25] * 4 + [0] * 4),
    (dict(r=8, ranks=[1, 2, 4, 8], method="dylora", k=4, scaling="sqrt"), [0.5] * 4 + [0] * 4),
    (dict(r=4, ranks=[1, 2, 4], method="custom", weights={1: 1.0, 2: 0.0, 4: 0.5}), [1.5, 0.5, 0.5, 0.5]),
    (dict(r=4, ranks=[1, 2, 4], method="multirank"), [1.0, 2 / 3, 1 / 3, 1 / 3]),  # its surrogate: mean of s_q P_q
    (dict(r=4, ranks=[1, 2, 4], method="custom", weights=[0.25, 0.25, 0.5], scaling="rank"),
     [0.25 + 0.125 + 0.125, 0.125 + 0.125, 0.125, 0.125]),
]


@pytest.mark.parametrize("kwargs,expected", CASES)
def test_golden_values(kwargs, expected):
    p = rank_weights(**kwargs)
    assert p.dtype == torch.float32 and p.shape == (kwargs["r"],)
    torch.testing.assert_close(p, torch.tensor(expected, dtype=torch.float32))


def test_custom_uniform_weights_equal_matryoshka():
    ranks = [1, 2, 4, 8]
    torch.testing.assert_close(rank_weights(8, ranks, "custom", weights=[1, 1, 1, 1]), rank_weights(8, ranks))


def test_prefix_rule():
    torch.testing.assert_close(prefix_weights(4, 0), torch.zeros(4))
    torch.testing.assert_close(prefix_weights(4, 3, "rank", 6.0), torch.tensor([2.0, 2.0, 2.0, 0.0]))
    with pytest.raises(ValueError, match="outside 0..r=4"):
        prefix_weights(4, 5)


def test_default_ranks():
    assert default_ranks(32) == [1, 2, 4, 8, 16, 32]
    assert default_ranks(1) == [1]
    assert default_ranks(12) == [1, 2, 4, 8, 12]


ERRORS = [
    (dict(r=8, ranks=[]), "ranks is empty"),
    (dict(r=8, ranks=[0, 2]), r"must be positive; remove \[0\]"),
    (dict(r=8, ranks=[-1]), "must be positive"),
    (dict(r=8, ranks=[1.5, 2]), r"must be integers; got \[1.5\]"),
    (dict(r=8, ranks=[2, 2, 4]), r"duplicates \[2\]"),
    (dict(r=8, ranks=[4, 16]), r"larger than r=8; drop them or raise r to at least 16"),
    (dict(r=0, ranks=[1]), "must be a positive integer"),
    (dict(r=8, ranks=[1], method="matryoska"), "Unknown method 'matryoska'. Available: matryoshka, lora, dylora, custom, multirank"),
    (dict(r=8, ranks=[1], scaling="log"), "Unknown scaling 'log'. Available: none, rank, sqrt"),
    (dict(r=8, ranks=[1, 2], method="custom", weights=[1.0, -0.5]), "non-negative"),
    (dict(r=8, ranks=[1, 2], method="custom"), "needs weights"),
    (dict(r=8, ranks=[1, 2], method="custom", weights=[1.0]), "one weight per rank"),
    (dict(r=8, ranks=[1, 2], method="custom", weights={3: 1.0}), "not in ranks"),
    (dict(r=8, ranks=[1, 2], weights=[1.0, 1.0]), "only used with method='custom'"),
    (dict(r=8, ranks=[1, 2], method="dylora"), "needs the sampled rank k"),
    (dict(r=8, ranks=[1, 2], method="dylora", k=4), "not in ranks"),
    (dict(r=8, ranks=[1], alpha=-1.0), "alpha"),
]


@pytest.mark.parametrize("kwargs,message", ERRORS)
def test_validation_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        rank_weights(**kwargs)


def test_all_problems_reported_together():
    with pytest.raises(ValueError) as err:
        rank_weights(4, [0, 3, 3, 9], method="nope", scaling="bad")
    text = str(err.value)
    for part in ("must be positive", "duplicates", "larger than r=4", "Unknown method", "Unknown scaling"):
        assert part in text
