import math

import pytest

from matryoshka_lora import aurac, log_aurac


def test_aurac_golden():
    # ranks 1,2,4,8 acc 10,20,30,40: trapezoids 15*1 + 25*2 + 35*4 = 205, / 7
    assert aurac([1, 2, 4, 8], [10, 20, 30, 40]) == pytest.approx(205 / 7)
    # log axis: each doubling has width 1: (15 + 25 + 35) / 3 = 25
    assert log_aurac([1, 2, 4, 8], [10, 20, 30, 40]) == pytest.approx(25.0)
    # non-power-of-two ranks: log2(3)-log2(1), log2(6)-log2(3)=1
    l3 = math.log2(3)
    expected = ((0.2 + 0.4) / 2 * l3 + (0.4 + 0.5) / 2 * 1.0) / math.log2(6)
    assert log_aurac([1, 3, 6], [0.2, 0.4, 0.5]) == pytest.approx(expected)
    assert aurac([1, 3, 6], [0.2, 0.4, 0.5]) == pytest.approx((0.3 * 2 + 0.45 * 3) / 5)


def test_constant_curve_and_single_rank():
    assert aurac([1, 2, 32], [7, 7, 7]) == pytest.approx(7)
    assert log_aurac([1, 2, 32], [7, 7, 7]) == pytest.approx(7)
    assert aurac([16], [0.3]) == 0.3
    assert log_aurac([16], [0.3]) == 0.3


@pytest.mark.parametrize("ranks,accs,message", [
    ([], [], "ranks is empty"),
    ([1, 2], [0.1], "one accuracy per rank"),
    ([2, 1], [0.1, 0.2], "strictly increasing"),
    ([1, 1], [0.1, 0.2], "strictly increasing"),
    ([0, 1], [0.1, 0.2], "positive"),
    ([1, 2], [0.1, float("nan")], "finite"),
])
def test_errors(ranks, accs, message):
    for fn in (aurac, log_aurac):
        with pytest.raises(ValueError, match=message):
            fn(ranks, accs)
