"""The split protocols' vocabulary: protocol, balance and balance-stage names, and each protocol's defaults.

Both the splitter (`split.make_split`) and the manifest's reader (`manifest.Manifest.read_csv`) resolve an unset
balance or stage from these defaults, so they live below both.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

PROTOCOLS = ("leakfree", "paper")
BALANCES = ("class_weights", "undersample", "none")
BALANCE_STAGES = ("train", "before_split")


@dataclass(frozen=True)
class ProtocolDefaults:
    """What a protocol does when the caller leaves `balance`, `balance_stage` or `crop` unset."""

    balance: str
    balance_stage: str
    crop: bool


PROTOCOL_DEFAULTS: dict[str, ProtocolDefaults] = {
    "leakfree": ProtocolDefaults(balance="class_weights", balance_stage="train", crop=True),
    "paper": ProtocolDefaults(balance="undersample", balance_stage="before_split", crop=False),
}


def protocol_defaults(protocol: str) -> ProtocolDefaults:
    """Defaults of a protocol; raises ValueError for an unknown name."""
    if protocol not in PROTOCOL_DEFAULTS:
        raise ValueError(f"unknown protocol {protocol!r}; expected one of {', '.join(PROTOCOLS)}")
    return PROTOCOL_DEFAULTS[protocol]


def resolve_balance(protocol: str, balance: str | None, stage: str | None) -> tuple[str, str]:
    """(balance, balance_stage) with None replaced by the protocol's defaults; unknown names raise."""
    defaults = protocol_defaults(protocol)
    balance = _check_choice("balance", balance or defaults.balance, BALANCES)
    return balance, _check_choice("balance_stage", stage or defaults.balance_stage, BALANCE_STAGES)


def _check_choice(name: str, value: str, choices: Sequence[str]) -> str:
    if value not in choices:
        raise ValueError(f"unknown {name} {value!r}; expected one of {', '.join(choices)}")
    return value
