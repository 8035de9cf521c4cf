"""The shipped Hydra configs, installed as the package ``reprpo_pl.conf`` (pyproject maps this folder
there) and found through Hydra's ``pkg://reprpo_pl.conf`` search path, never through a file path."""
