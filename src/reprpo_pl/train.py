"""Train one method on one source and evaluate it on every shift target.

    python -m reprpo_pl.train [method=innerdpo] [transform=ether] [model=smollm2_135m] [dataset=math] ...
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import get_class, instantiate
from omegaconf import DictConfig

from reprpo_pl.config import CONF_DIR, run_cli
from reprpo_pl.data.datamodule import PreferenceDataModule
from reprpo_pl.errors import UserError
from reprpo_pl.eval.callback import ShiftEvalCallback

log = logging.getLogger(__name__)


def train(cfg: DictConfig, run_dir: Path) -> dict[str, Any]:
    """Fit ``cfg.method`` and return the results document (also written to ``run_dir``)."""
    L.seed_everything(cfg.seed, workers=True)
    torch.autograd.set_detect_anomaly(bool(cfg.debug.detect_anomaly))
    datamodule = PreferenceDataModule(cfg.data, cfg.dataset, cfg.eval)  # validates data before the model loads
    try:
        module_cls = get_class(cfg.method._target_)
    except ImportError:
        raise UserError(f"method._target_={cfg.method._target_} cannot be imported; pick a method from conf/method/") from None
    module = module_cls(cfg)
    datamodule.tokenizer = module.tokenizer
    callbacks = []
    for name, cb_cfg in cfg.callbacks.items():
        kwargs = {"dirpath": run_dir / "checkpoints"} if name == "checkpoint" else {}
        callbacks.append(instantiate(cb_cfg, **kwargs))
    loggers = [instantiate(lg, save_dir=str(run_dir)) for lg in cfg.logger.values()]
    trainer: L.Trainer = instantiate(cfg.trainer, default_root_dir=str(run_dir), callbacks=callbacks, logger=loggers)
    trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.ckpt_path)
    evaluator = next(cb for cb in callbacks if isinstance(cb, ShiftEvalCallback))
    return evaluator.results or {}


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="train")
def main(cfg: DictConfig) -> float:
    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    multirun = hydra_cfg.mode == RunMode.MULTIRUN
    results = run_cli(lambda: train(cfg, run_dir), run_dir=run_dir, multirun=multirun)
    return float(results.get(cfg.optimized_metric, 0.0))


if __name__ == "__main__":
    main()
