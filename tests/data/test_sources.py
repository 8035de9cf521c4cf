"""load_pairs dispatch and subsets, the shift table, the 18 dataset configs and the embedded subset."""

from __future__ import annotations

import dataclasses
import importlib.util
import logging
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from reprpo_pl.data.ethics import ethics_file
from reprpo_pl.data.genies import genies_file
from reprpo_pl.data.sources import (
    ETHICS_PREFIX,
    Target,
    embedded_root,
    load_pairs,
    parse_shift_table,
    split_target_name,
)
from reprpo_pl.errors import UserError

REPO = Path(__file__).resolve().parents[2]
FIXTURES = Path(__file__).parent / "fixtures"
SHARED = REPO.parent / "shared" / "data"
DATASET_CONFIGS = sorted((REPO / "conf" / "dataset").glob("*.yaml"))
needs_shared = pytest.mark.skipif(not SHARED.is_dir(), reason="full data ../shared/data is absent")


def _load(name: str, split: str = "test", **kwargs):
    return load_pairs(name, split, genies_root=FIXTURES / "genies", ethics_root=FIXTURES / "ethics", **kwargs)


def test_dispatches_on_the_ethics_prefix():
    assert _load("ethics/justice")["id"][0] == "ethics/justice/test/0"
    assert _load("toy")["id"][0] == "toy/test/0"


@pytest.mark.parametrize(("name", "expected"), [("math", ("math", "test")), ("ethics/justice@test_hard", ("ethics/justice", "test_hard")),
                                              ("math@train", ("math", "train")), ("math@", ("math", ""))])
def test_split_target_name(name, expected):
    assert split_target_name(name) == expected


def test_a_target_selects_its_split():
    assert _load(*split_target_name("ethics/justice@test_hard"))["id"][0] == "ethics/justice/test_hard/0"
    with pytest.raises(UserError, match=r"split='test_hard' is not a data split: use one of train, test$"):
        _load(*split_target_name("toy@test_hard"))  # GENIES has no test_hard


def test_the_in_sample_row_is_not_a_target():
    cfg = {"source": "math", "targets": [{"name": "math", "shift": "in_domain"}, {"name": "math@train", "shift": "cross_domain"}]}
    with pytest.raises(UserError, match=r"dataset.targets lists math@train, the in-sample row every run scores already: drop it"):
        parse_shift_table(OmegaConf.create(cfg))


def test_n_is_a_seeded_subset():
    full = _load("ethics/utilitarianism")
    picked = [_load("ethics/utilitarianism", n=2, seed=seed)["id"] for seed in range(8)]
    assert all(len(ids) == 2 and set(ids) <= set(full["id"]) for ids in picked)
    assert picked[0] == _load("ethics/utilitarianism", n=2, seed=0)["id"]
    assert len({tuple(ids) for ids in picked}) > 1


def test_n_larger_than_the_data_returns_all_with_a_warning(caplog):
    with caplog.at_level(logging.WARNING, logger="reprpo_pl.data.sources"):
        assert len(_load("toy", n=50)) == 2
    assert "asked for 50 pairs but only 2 exist" in caplog.text


@pytest.mark.parametrize("n", [0, -3, 2.5, True])
def test_bad_n(n):
    with pytest.raises(UserError, match=rf"n={n!r} must be a positive integer"):
        _load("toy", n=n)


def test_embedded_yields_pairs_for_every_math_target():
    targets = parse_shift_table(OmegaConf.load(REPO / "conf" / "dataset" / "math.yaml"))
    for target in targets:
        assert len(load_pairs(target.name, "test", genies_root=None, ethics_root=None)) >= 60, target
    assert len(load_pairs("math", "train", genies_root=None, ethics_root=None)) >= 100


@pytest.mark.parametrize(("name", "split"), [("code", "test"), ("change_my_view", "train"), ("ethics/deontology", "test")])
def test_missing_from_the_embedded_subset(name, split):
    with pytest.raises(UserError, match=rf"{name} \({split}\) is not in the embedded subset, which holds .*: set data\."):
        load_pairs(name, split, genies_root=None, ethics_root=None)


def test_shift_table_puts_in_domain_first_and_targets_are_frozen():
    cfg = {"source": "math", "targets": [{"name": "ethics/justice", "shift": "moral_transfer"}, {"name": "math", "shift": "in_domain"}]}
    targets = parse_shift_table(OmegaConf.create(cfg))
    assert targets == [Target("math", "in_domain"), Target("ethics/justice", "moral_transfer")]
    with pytest.raises(dataclasses.FrozenInstanceError):
        targets[0].name = "code"  # type: ignore[misc]


@pytest.mark.parametrize(
    ("cfg", "message"),
    [
        ({"source": "math", "targets": [{"name": "math", "shift": "in_domian"}]}, r"shift='in_domian': did you mean in_domain\?"),
        ({"source": "math", "targets": [{"name": "code", "shift": "orthogonal"}]}, r"it needs exactly one, \{name: math, shift: in_domain\}"),
        ({"source": "math", "targets": [{"name": "code", "shift": "in_domain"}]}, r"in_domain targets \['code'\]"),
        ({"source": "math", "targets": [{"name": "math", "shift": "in_domain"}, {"name": "code", "shift": "safety"},
                                         {"name": "code", "shift": "orthogonal"}]}, r"lists code more than once"),
        ({"source": "math", "targets": ["math"]}, r"dataset.targets\[0\]='math' must be a mapping"),
        ({"source": "math", "targets": []}, r"dataset.targets=\[\] must be a non-empty list"),
        ({"targets": [{"name": "math", "shift": "in_domain"}]}, r"dataset.source=None must name"),
    ],
)  # fmt: skip
def test_shift_table_errors(cfg, message):
    with pytest.raises(UserError, match=message):
        parse_shift_table(cfg)


def test_eighteen_dataset_configs_parse_with_one_orthogonal_target():
    assert len(DATASET_CONFIGS) == 18
    for path in DATASET_CONFIGS:
        cfg = OmegaConf.load(path)
        targets = parse_shift_table(cfg)
        assert cfg.source == path.stem and targets[0] == Target(path.stem, "in_domain")
        assert [t.shift for t in targets].count("orthogonal") == 1, path


@needs_shared
def test_every_configured_target_exists_in_the_full_data():
    for path in DATASET_CONFIGS:
        for target in parse_shift_table(OmegaConf.load(path)):
            if target.name.startswith(ETHICS_PREFIX):
                ethics_file(SHARED / "ethics", target.name[len(ETHICS_PREFIX) :], "test")
            else:
                genies_file(SHARED / "genies", target.name, "test")
        genies_file(SHARED / "genies", OmegaConf.load(path).source, "train")


@needs_shared
def test_embedded_files_are_what_make_embedded_writes(tmp_path):
    spec = importlib.util.spec_from_file_location("make_embedded", REPO / "scripts" / "make_embedded.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    script.make_embedded(SHARED / "genies", SHARED / "ethics", tmp_path)
    shipped = embedded_root("genies").parent

    def files(root: Path) -> dict[str, bytes]:
        return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}

    assert files(tmp_path) == files(shipped)


@needs_shared
def test_embedded_pairs_match_the_full_data():
    for name in ("math", "ethics/utilitarianism"):
        embedded = load_pairs(name, "test", genies_root=None, ethics_root=None, seed=1)
        full = load_pairs(name, "test", genies_root=SHARED / "genies", ethics_root=SHARED / "ethics", seed=1)
        assert embedded[:] == full.select(range(len(embedded)))[:]
