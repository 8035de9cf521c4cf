"""reprpo_pl: representation preference optimisation vs DPO, with LoRA, Lightning and Hydra."""

__version__ = "0.1.0"
