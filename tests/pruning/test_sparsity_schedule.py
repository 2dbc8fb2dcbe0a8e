import pytest

from fedsplit.pruning import PruningError, SparsitySchedule


def test_cubic_start_mid_end():
    s = SparsitySchedule(target=0.8, start_round=2, end_round=12, kind="cubic")
    assert s(0) == 0.0 and s(2) == 0.0  # before/at the start: initial sparsity
    # progress 0.5: 0.8 + (0 - 0.8) * 0.5**3 = 0.7
    assert s(7) == pytest.approx(0.7)
    assert s(12) == pytest.approx(0.8) and s(50) == pytest.approx(0.8)
    values = [s(t) for t in range(2, 13)]
    assert values == sorted(values)  # monotone
    # cubic front-loads: more than linear at every interior round
    lin = SparsitySchedule(target=0.8, start_round=2, end_round=12, kind="linear")
    assert all(s(t) > lin(t) for t in range(3, 12))


def test_linear_and_initial():
    s = SparsitySchedule(target=0.6, start_round=0, end_round=4, kind="linear", initial=0.2)
    assert [s(t) for t in range(6)] == pytest.approx([0.2, 0.3, 0.4, 0.5, 0.6, 0.6])
    c = SparsitySchedule(target=0.6, start_round=0, end_round=4, kind="cubic", initial=0.2)
    assert c(2) == pytest.approx(0.6 + (0.2 - 0.6) * 0.5 ** 3)


def test_constant():
    s = SparsitySchedule(target=0.5, kind="constant")
    assert s(0) == s(1) == s(100) == 0.5
    late = SparsitySchedule(target=0.5, start_round=3, end_round=3, kind="constant")
    assert late(2) == 0.0 and late(3) == 0.5


@pytest.mark.parametrize("kwargs", [dict(target=1.0), dict(target=-0.1),
                                    dict(target=0.5, start_round=5, end_round=2),
                                    dict(target=0.5, kind="exp")])
def test_invalid(kwargs):
    with pytest.raises(PruningError):
        SparsitySchedule(**kwargs)
