"""Layer-spec parser: every accepted form, fractions, negatives, duplicates, and the error messages."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from reprpo_pl.errors import UserError
from reprpo_pl.reprs.layers import DEFAULT_LAYERS, parse_layers

L = 30  # SmolLM2-135M


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("range(0.5,-2)", list(range(15, 28))),
        ("range(0, 30, 5)", [0, 5, 10, 15, 20, 25]),
        ("0.5:-2", list(range(15, 28))),
        ("0:30:10", [0, 10, 20]),
        ("::10", [0, 10, 20]),
        (":3", [0, 1, 2]),
        ("27:", [27, 28, 29]),
        ("-1:0.5:-4", [17, 21, 25, 29]),  # negative step, result sorted
        ("0.3,0.6,-1", [9, 18, 29]),
        ("12,14", [12, 14]),
        (" 14 , 12 ,12 ", [12, 14]),  # spaces, duplicates, order
        ("[12,14]", [12, 14]),
        ("-2", [28]),
        ("0.5", [15]),
        ("-0.5", [15]),  # ⌊-0.5·30⌋ = -15 → 15
        ("1e-1", [3]),
        ([12, 14, 16], [12, 14, 16]),
        ((16, 12, -30), [0, 12, 16]),
        ([0.5, -1, 29], [15, 29]),
        (["12", "0.5"], [12, 15]),
        (OmegaConf.create({"layers": [12, 14]}).layers, [12, 14]),  # Hydra hands lists as ListConfig
        (7, [7]),
        (-1, [29]),
        (0.3, [9]),
        (2.0, [2]),  # no fractional part → absolute
    ],
)
def test_forms(spec: object, expected: list[int]) -> None:
    assert parse_layers(spec, L) == expected


def test_default_is_half_depth_to_L_minus_2() -> None:
    assert parse_layers(DEFAULT_LAYERS, 30) == list(range(15, 28))
    assert parse_layers(DEFAULT_LAYERS, 8) == [4, 5]
    with pytest.raises(UserError, match="selects none"):  # L=4 (the tiny test model): range(2, 2) is empty
        parse_layers(DEFAULT_LAYERS, 4)


@pytest.mark.parametrize(
    ("spec", "fragment"),
    [
        ("40", "layer 40 out of range for a model with L=30 blocks (valid 0..29 or -30..-1"),
        ("-31", "layer -31 out of range"),
        ([12, 30], "layer 30 out of range"),
        (1.5, "layer 1.5 out of range"),
        ("31:", "range bound 31 out of range"),
        ("range(0,40)", "range bound 40 out of range"),
        ("0.9:0.5", "selects none"),
        ("0:-1:-1", "selects none"),
        ([], "selects none"),
        ("", "empty"),
        ("a,b", "cannot read 'a' as a number"),
        ("range(1,2", "cannot read 'range(1' as a number"),
        ("range(1)", "range() needs 2 or 3 arguments"),
        ("1:2:3:4", "a slice is start:stop"),
        ("1:5:0", "step 0 is not a non-zero integer"),
        ("1:5:0.5", "step 0.5 is not a non-zero integer"),
        ("12;14", "cannot read '12;14' as a number"),
        (None, "unsupported type NoneType"),
        ([True], "cannot read True as a layer"),
    ],
)
def test_errors_name_the_spec_and_L(spec: object, fragment: str) -> None:
    with pytest.raises(UserError) as info:
        parse_layers(spec, L)
    message = str(info.value)
    assert fragment in message
    assert repr(spec) in message
    assert "L=30" in message
    assert "\n" not in message
