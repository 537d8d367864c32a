"""Bradley-Terry with ties: equal to the Rao-Kupper formulas written out, probabilities that sum to 1, ties at margin
0 as half a win each, and bad rows counted and left out, never dropped silently."""

import math

import pytest
import torch

from rtedit.train.reward.loss import bt_ties_loss, label_ids, outcome_log_probs


def _reference(d, y, k):
    """Rao-Kupper with k = e^m, from the strengths: P(A) = a / (a + k b), P(tie) = (k^2 - 1) a b / ((a+kb)(b+ka))."""
    a, b = math.exp(d), 1.0
    p = [a / (a + k * b), b / (b + k * a), (k * k - 1) * a * b / ((a + k * b) * (b + k * a))]
    return -math.log(p[y]), p


@pytest.mark.parametrize("margin", [0.5, math.log(5.0)])
def test_equals_the_rao_kupper_formulas(margin):
    logits = torch.tensor([-2.0, -0.3, 0.0, 0.7, 3.0, 1.1], dtype=torch.float64)
    labels = torch.tensor([0, 1, 2, 2, 0, 1])
    loss, stats = bt_ties_loss(logits, labels, margin)
    refs = [_reference(float(d), int(y), math.exp(margin)) for d, y in zip(logits, labels)]
    assert float(loss) == pytest.approx(sum(r[0] for r in refs) / len(refs), rel=1e-12)
    probs = outcome_log_probs(logits, margin).exp()
    torch.testing.assert_close(probs.sum(1), torch.ones(6, dtype=torch.float64))
    torch.testing.assert_close(probs, torch.tensor([r[1] for r in refs], dtype=torch.float64))
    assert stats.rows == stats.used == 6 and stats.num_bad == 0
    # Decided rows: -2.0 labelled A is wrong, -0.3 labelled B right, 3.0 labelled A right, 1.1 labelled B wrong.
    assert stats.accuracy == pytest.approx(2 / 4)


def test_margin_zero_is_plain_bradley_terry_and_ties_are_half_a_win():
    d = torch.tensor([0.4, -1.2, 0.9])
    loss, _ = bt_ties_loss(d, torch.tensor([0, 1, 2]), 0.0)
    def bce(x):
        return -torch.nn.functional.logsigmoid(x)

    expected = (bce(d[0]) + bce(-d[1]) + 0.5 * (bce(d[2]) + bce(-d[2]))) / 3
    torch.testing.assert_close(loss, expected)
    assert torch.isinf(outcome_log_probs(d, 0.0)[:, 2]).all()


def test_bad_rows_are_counted_and_left_out():
    logits = torch.tensor([1.0, float("nan"), -0.5, 2.0, float("inf")], requires_grad=True)
    labels = label_ids(["A", "B", "sideways", "tie", None])
    assert labels.tolist() == [0, 1, -1, 2, -1]
    loss, stats = bt_ties_loss(logits, labels, 1.0)
    clean, _ = bt_ties_loss(logits.detach()[[0, 3]], labels[[0, 3]], 1.0)
    torch.testing.assert_close(loss.detach(), clean)
    assert stats.rows == 5 and stats.used == 2 and stats.num_bad == 3
    assert dict(stats.bad) == {"bad_label": 2, "non_finite_logit": 1}
    loss.backward()
    assert torch.isfinite(logits.grad).all() and logits.grad[[1, 2, 4]].abs().sum() == 0
    none, stats = bt_ties_loss(torch.tensor([0.3]), torch.tensor([-1]), 1.0)
    assert float(none) == 0.0 and stats.used == 0 and stats.num_bad == 1


def test_argument_errors():
    with pytest.raises(ValueError, match="tie_margin"):
        bt_ties_loss(torch.zeros(2), torch.zeros(2, dtype=torch.long), -1.0)
    with pytest.raises(ValueError, match=r"\(N,\)"):
        bt_ties_loss(torch.zeros(2, 1), torch.zeros(2, dtype=torch.long))
