"""A budget's parsing and its limits, apart from the ledger (see the integration tests)."""

from __future__ import annotations

import pytest

from jobs.budget import Budget, Spend
from jobs.validation import ValidationError


def test_a_budget_parses_strings_numbers_and_nothing() -> None:
    assert Budget.parse("1500", "2.5") == Budget(tokens=1500, usd=2.5)
    assert Budget.parse(1500, None) == Budget(tokens=1500)
    assert Budget.parse("", "") == Budget()
    assert not Budget.parse() and Budget(usd=1)


@pytest.mark.parametrize(
    ("tokens", "usd", "message"),
    [
        ("-5", None, "budget_tokens: must be above 0, got '-5'"),
        ("0", None, "budget_tokens: must be above 0, got '0'"),
        ("1.5", None, "budget_tokens: must be a whole number of tokens, got '1.5'"),
        (True, None, "budget_tokens: must be a whole number of tokens, got True"),
        (None, "inf", "budget_usd: must be a number of US dollars, got 'inf'"),
        (None, "$5", "budget_usd: must be a number of US dollars, got '$5'"),
        (None, [5], "budget_usd: must be a number of US dollars, got [5]"),
    ],
)
def test_a_bad_budget_names_its_field(tokens: object, usd: object, message: str) -> None:
    with pytest.raises(ValidationError) as caught:
        Budget.parse(tokens, usd)
    assert str(caught.value) == message


def test_a_spend_goes_past_the_limit_it_exceeds_and_no_other() -> None:
    both = Budget(tokens=1000, usd=0.01)
    assert both.exceeded_by(Spend(1000, 0.01)) is None
    assert both.exceeded_by(Spend(1001, 0.0)) == "1,001 tokens of a budget of 1,000"
    assert both.exceeded_by(Spend(10, 0.02)) == "$0.0200 of a budget of $0.0100"
    assert Budget(tokens=5).exceeded_by(Spend(5, None)) is None
    # Dollars without a price cannot be judged: a dollar budget never lets them pass.
    assert "without a price" in (Budget(usd=1).exceeded_by(Spend(1, None)) or "")
    assert Spend(1, 0.5) + Spend(2, None) == Spend(3, None)
