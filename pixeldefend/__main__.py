"""`python -m pixeldefend`: what `torchrun -m pixeldefend ...` starts on every rank."""

from .cli import app

if __name__ == "__main__":
    app(prog_name="pixeldefend")
