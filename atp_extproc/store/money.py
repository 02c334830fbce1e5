"""Exact money: prices as decimals, amounts as integer picodollars (1e-12 USD).

A price per 1K tokens with up to 9 decimal places is an exact whole number of
picodollars per token, so tokens x price sums exactly; dollars come back as Decimal and
are rounded only for display. SQLite's 64-bit integers hold ±9.2 million USD per row.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from decimal import ROUND_HALF_EVEN, Decimal

PICO_PER_USD = 10 ** 12
_PICO_PER_TOKEN_PER_USD_PER_1K = Decimal(10 ** 9)
CENT = Decimal("0.01")


def to_decimal(value: float | int | str | Decimal) -> Decimal:
    """A price as written in config: floats go through their shortest repr (0.00015)."""
    if isinstance(value, Decimal):
        return value
    if isinstance(value, float):
        return Decimal(repr(value))
    return Decimal(value)


def pico_per_token(price_per_1k: Decimal) -> int:
    return int((price_per_1k * _PICO_PER_TOKEN_PER_USD_PER_1K)
               .to_integral_value(ROUND_HALF_EVEN))


def whole_pico_per_token(price_per_1k: Decimal) -> bool:
    """Whether the price is exactly whole picodollars per token (at most 9 decimal
    places of USD per 1K tokens); any other price would be rounded, possibly to 0."""
    scaled = price_per_1k * _PICO_PER_TOKEN_PER_USD_PER_1K
    return scaled == scaled.to_integral_value()


def usd(pico: int) -> Decimal:
    return Decimal(pico) / PICO_PER_USD


def cents(pico: int) -> Decimal:
    return usd(pico).quantize(CENT, rounding=ROUND_HALF_EVEN)


def _text(d: Decimal) -> str:
    text = format(d.normalize(), "f")
    return text if text != "-0" else "0"


@dataclass(frozen=True, slots=True)
class PriceSnapshot:
    """One model's prices at one time; `version` names them forever in the ledger."""

    model: str
    input_per_1k: Decimal
    output_per_1k: Decimal
    version: str
    input_pico: int    # per token
    output_pico: int

    @classmethod
    def of(cls, model: str, input_per_1k: float | int | str | Decimal,
           output_per_1k: float | int | str | Decimal) -> PriceSnapshot:
        pin, pout = to_decimal(input_per_1k), to_decimal(output_per_1k)
        if pin < 0 or pout < 0:
            raise ValueError("prices cannot be negative")
        version = hashlib.sha256(
            f"{model}\n{_text(pin)}\n{_text(pout)}".encode()).hexdigest()[:16]
        return cls(model, pin, pout, version, pico_per_token(pin), pico_per_token(pout))

    @classmethod
    def from_model(cls, model: object) -> PriceSnapshot:
        """From a config.Model (name, price.input_per_1k, price.output_per_1k)."""
        price = model.price  # type: ignore[attr-defined]
        return cls.of(model.name, price.input_per_1k, price.output_per_1k)  # type: ignore[attr-defined]

    def cost_pico(self, input_tokens: int, output_tokens: int) -> int:
        return input_tokens * self.input_pico + output_tokens * self.output_pico

    @property
    def input_text(self) -> str:
        return _text(self.input_per_1k)

    @property
    def output_text(self) -> str:
        return _text(self.output_per_1k)


class PriceBook:
    """One PriceSnapshot per (model, prices), computed once: a snapshot costs a SHA-256
    and Decimal parsing, too much to redo on every request."""

    __slots__ = ("_cache",)

    def __init__(self) -> None:
        self._cache: dict[tuple[str, float, float], PriceSnapshot] = {}

    def snapshot(self, model: object) -> PriceSnapshot:
        """For a config.Model (name, price.input_per_1k, price.output_per_1k)."""
        price = model.price  # type: ignore[attr-defined]
        key = (model.name, price.input_per_1k, price.output_per_1k)  # type: ignore[attr-defined]
        snap = self._cache.get(key)
        if snap is None:
            snap = self._cache[key] = PriceSnapshot.of(*key)
        return snap
