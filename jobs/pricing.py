"""What calls cost in dollars: a price per model, and the words a report uses without one.

Prices are USD per million tokens, prompt (input) and completion (output) apart, as
providers quote them. A price comes from the model table (:data:`jobs.settings.MODEL_LIMITS`)
only where the provider publishes one, and ``INFERENCE_PRICE_INPUT`` /
``INFERENCE_PRICE_OUTPUT`` set it for the configured model. Dollars are always computed
from the ledger's token counts, so they match the tokens call for call, retries the
provider charged included.
"""

from __future__ import annotations

from dataclasses import dataclass

#: What a report says where a model has no price.
NO_PRICE = (
    "no price: set INFERENCE_PRICE_INPUT and INFERENCE_PRICE_OUTPUT "
    "(USD per million tokens) to show dollars"
)


@dataclass(frozen=True)
class Price:
    """USD per million prompt (input) and completion (output) tokens."""

    input: float
    output: float

    def usd(self, prompt_tokens: int, completion_tokens: int) -> float:
        """The dollars that many tokens cost."""
        return (prompt_tokens * self.input + completion_tokens * self.output) / 1_000_000


def usage_text(prompt_tokens: int, completion_tokens: int, usd: float | None) -> str:
    """``1,200 prompt + 300 completion tokens, $0.0012``, or the tokens followed by
    :data:`NO_PRICE` in parentheses where the model has no price."""
    tokens = f"{prompt_tokens:,} prompt + {completion_tokens:,} completion tokens"
    return f"{tokens}, {dollars(usd)}" if usd is not None else f"{tokens} ({NO_PRICE})"


def dollars(usd: float | None) -> str:
    """``$1.2346`` (four decimals: a call can cost a fraction of a cent), or ``-``."""
    return "-" if usd is None else f"${usd:,.4f}"
