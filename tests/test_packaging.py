"""The package as users install it: the wheel ships every config and module, and an installed copy (no
``-e``) trains, evaluates (from a checkpoint and from the adapter folder) and reports from a directory
outside the repository, with a user's own config folder on Hydra's search path."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TINY = ["model=tiny_random", "data.n_train=4", "data.batch_size=2", "eval.n_samples=2", "data.max_length=96",
        "data.max_prompt_length=48", "callbacks.generations.enabled=false"]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    # no build isolation: the venv's setuptools builds it offline, as `pip install .` would with network
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(REPO)],
                   check=True, capture_output=True, text=True)
    (found,) = out.glob("reprpo_pl-*.whl")
    return found


def test_wheel_holds_every_config_and_module(wheel: Path):
    names = set(zipfile.ZipFile(wheel).namelist())
    configs = {f"reprpo_pl/conf/{p.relative_to(REPO / 'conf')}" for p in (REPO / "conf").rglob("*.yaml")}
    modules = {f"{p.relative_to(REPO / 'src')}" for p in (REPO / "src" / "reprpo_pl").rglob("*.py")}
    assert configs and not (missing := sorted(configs - names)), f"configs missing from the wheel: {missing}"
    assert not (missing := sorted(modules - names)), f"modules missing from the wheel (list the package in pyproject.toml): {missing}"
    assert "reprpo_pl/embedded/genies/math/train.json" in names
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    scripts = zipfile.ZipFile(wheel).read(entry_points).decode()
    for script in ("reprpo-train", "reprpo-eval", "reprpo-report"):
        assert script in scripts


def test_installed_wheel_runs_train_eval_report_outside_the_repo(wheel: Path, tmp_path: Path):
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
                   check=True, capture_output=True, text=True)
    work = tmp_path / "elsewhere"  # the user's project folder, with their own config group option
    (work / "my_conf" / "dataset").mkdir(parents=True)
    (work / "my_conf" / "dataset" / "mine.yaml").write_text(
        "source: math\ntargets:\n  - {name: math, shift: in_domain}\n  - {name: change_my_view, shift: cross_domain}\n")
    env = {**os.environ, "PYTHONPATH": str(target), "TOKENIZERS_PARALLELISM": "false"}

    def run(*args: str) -> subprocess.CompletedProcess:
        proc = subprocess.run(args, cwd=work, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return proc

    where = run(sys.executable, "-c", "import reprpo_pl, reprpo_pl.conf; print(reprpo_pl.__file__, reprpo_pl.conf.__file__)")
    assert all(Path(p).is_relative_to(target) for p in where.stdout.split()), where.stdout
    bin_dir = target / "bin"
    run(str(bin_dir / "reprpo-train"), *TINY, "method=dpo", "hydra.searchpath=[file://my_conf]", "dataset=mine",
        "hydra.run.dir=runs/dpo")
    results = json.loads((work / "runs" / "dpo" / "results.json").read_text())
    assert results["dataset"] == "math" and [t["target"] for t in results["targets"]] == ["math@train", "math", "change_my_view"]
    assert (work / "runs" / "dpo" / "adapter" / "adapter_model.safetensors").is_file()
    run(sys.executable, "-m", "reprpo_pl.eval", "ckpt_path=runs/dpo", "out_dir=runs/dpo/eval/from_ckpt")
    run(str(bin_dir / "reprpo-eval"), "ckpt_path=runs/dpo/adapter", "out_dir=runs/dpo/eval/from_adapter")
    for name in ("from_ckpt", "from_adapter"):
        again = json.loads((work / "runs" / "dpo" / "eval" / name / "results.json").read_text())
        assert [t["acc"] for t in again["targets"]] == [t["acc"] for t in results["targets"]]
    run(str(bin_dir / "reprpo-report"), "runs")
    assert (work / "runs" / "report.md").is_file()
