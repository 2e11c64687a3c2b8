"""`python -m pixeldefend ...`: the CLI, and the module torchrun launches per rank
(`torchrun --nproc-per-node N -m pixeldefend train ...`)."""

from pixeldefend.cli import main

if __name__ == "__main__":
    main()
