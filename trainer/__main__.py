"""`python -m trainer ...`, the same command as `trainer ...`; what torchrun starts per rank:
`torchrun --nproc-per-node N -m trainer distill ...`."""

from trainer.cli import main

if __name__ == "__main__":
    main(prog_name="trainer")
