"""Parse a layer spec (which decoder blocks to collect) into sorted absolute block indices.

Forms, for a model with L decoder blocks:

- slice ``"a:b"`` / ``"a:b:step"`` (needs no quoting in a Hydra override; empty ends mean 0 and L);
- the prototype's ``"range(a,b)"`` / ``"range(a,b,step)"`` (fine inside YAML; Hydra's override
  grammar reads ``range(...)`` as a sweep, so use the slice form on the command line);
- a comma list ``"0.3,0.6,-1"`` / ``"12,14"``, a Python or OmegaConf list ``[12, 14, 16]``,
  or a single int/float.

Each value: negative counts from the end (``-2 → L-2``); a value with a fractional part is a
fraction of depth (``0.3 → ⌊0.3·L⌋``; ``2.0`` has none and means block 2); integers are absolute.
Ranges are half-open like Python's. Duplicates are removed and the result is sorted.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import NoReturn

from reprpo_pl.errors import UserError

DEFAULT_LAYERS = "0.5:-2"
"""Half depth to L-2, the prototype's ``range(0.5,-2)``. For L=30 (SmolLM2-135M): blocks 15..27."""

_INT = re.compile(r"[+-]?\d+")
_RANGE = re.compile(r"range\((.*)\)")


def parse_layers(spec: object, n_layers: int) -> list[int]:
    """Resolve ``spec`` to sorted, distinct block indices in ``0..n_layers-1``.

    The default ``"0.5:-2"`` (= ``"range(0.5,-2)"``) gives ``range(15, 28)``, i.e. blocks 15..27,
    for L=30 (SmolLM2-135M). Raises ``UserError`` (one line naming the spec, L and the fix) on
    malformed text, out-of-range values, a zero or fractional step, or an empty selection.
    """
    if isinstance(n_layers, bool) or not isinstance(n_layers, int) or n_layers < 1:
        raise UserError(f"layer spec {spec!r}: the model must have at least one block, got L={n_layers!r}")
    parser = _SpecParser(spec, n_layers)
    layers = sorted(set(parser.parse()))
    if not layers:
        parser.fail(
            f"selects none of the model's L={n_layers} blocks (ranges are half-open like Python's: "
            "the start must lie below the stop, e.g. '0.5:-2')"
        )
    return layers


class _SpecParser:
    """One parse of one spec; keeps the spec and L so every error can name them."""

    def __init__(self, spec: object, n_layers: int) -> None:
        self.spec = spec
        self.n_layers = n_layers

    def fail(self, message: str) -> NoReturn:
        raise UserError(f"layer spec {self.spec!r}: {message}")

    def fail_malformed(self, problem: str) -> NoReturn:
        self.fail(
            f"{problem} (model has L={self.n_layers} blocks; write e.g. '0.5:-2', 'range(0.5,-2)', '12,14' or [12, 14])"
        )

    def parse(self) -> list[int]:
        spec = self.spec
        if isinstance(spec, str):
            return self._parse_text(spec.strip())
        if isinstance(spec, (int, float)) and not isinstance(spec, bool):
            return [self._layer(spec)]
        if isinstance(spec, Sequence):  # list, tuple, OmegaConf ListConfig
            return [self._layer(self._number(v) if isinstance(v, str) else v) for v in spec]
        self.fail_malformed(f"unsupported type {type(spec).__name__}")

    def _parse_text(self, text: str) -> list[int]:
        if text.startswith("[") and text.endswith("]"):
            text = text[1:-1]
        if match := _RANGE.fullmatch(text):
            parts = match.group(1).split(",")
            if not 2 <= len(parts) <= 3 or not all(p.strip() for p in parts):
                self.fail_malformed("range() needs 2 or 3 arguments")
            return self._range(*parts)
        if ":" in text:
            parts = text.split(":")
            if len(parts) > 3:
                self.fail_malformed("a slice is start:stop or start:stop:step")
            return self._range(*parts)
        if not text:
            self.fail_malformed("it is empty")
        return [self._layer(self._number(p)) for p in text.split(",")]

    def _range(self, start: str, stop: str, step: str = "") -> list[int]:
        """Half-open ``range(start, stop, step)``; empty ``start``/``stop``/``step`` mean 0, L, 1."""
        lo = self._bound(self._number(start)) if start.strip() else 0
        hi = self._bound(self._number(stop)) if stop.strip() else self.n_layers
        stride = self._number(step) if step.strip() else 1
        if not isinstance(stride, int) or stride == 0:
            self.fail_malformed(f"step {step.strip()} is not a non-zero integer")
        return list(range(lo, hi, stride))

    def _number(self, text: str) -> int | float:
        text = text.strip()
        if _INT.fullmatch(text):
            return int(text)
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not math.isfinite(value):
            self.fail_malformed(f"cannot read {text!r} as a number")
        return value

    def _resolve(self, value: int | float) -> int:
        """Fraction of depth → ⌊x·L⌋, then negative → counted from the end."""
        if isinstance(value, float) and not value.is_integer():
            value = math.floor(value * self.n_layers)
        index = int(value)
        return index + self.n_layers if index < 0 else index

    def _layer(self, value: object) -> int:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            self.fail_malformed(f"cannot read {value!r} as a layer")
        index = self._resolve(value)
        if not 0 <= index < self.n_layers:
            self.fail(
                f"layer {value} out of range for a model with L={self.n_layers} blocks "
                f"(valid 0..{self.n_layers - 1} or -{self.n_layers}..-1, or a fraction of depth)"
            )
        return index

    def _bound(self, value: int | float) -> int:
        index = self._resolve(value)
        if not 0 <= index <= self.n_layers:
            self.fail(
                f"range bound {value} out of range for a model with L={self.n_layers} blocks "
                f"(valid 0..{self.n_layers} or -{self.n_layers}..-1, or a fraction of depth)"
            )
        return index
