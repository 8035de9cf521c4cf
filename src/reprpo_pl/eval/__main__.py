"""``python -m reprpo_pl.eval ckpt_path=<run dir | .ckpt | adapter folder>``: see `reprpo_pl.eval.from_checkpoint`."""

from reprpo_pl.eval.from_checkpoint import main

if __name__ == "__main__":
    main()
