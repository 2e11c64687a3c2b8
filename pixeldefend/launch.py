"""`python -m pixeldefend.launch`: torchrun that exits with pixeldefend's own exit code.

torchrun (torch.distributed.run) exits 1 whenever any rank exits non-zero, so a CI job
reading only its code cannot tell a failed gate (1) from an unreadable input or a bad
option (2). Every pixeldefend rank leaves with the same, agreed code (`ranks.leave_together`);
this launcher takes torchrun's arguments unchanged, runs it in-process, and exits with that
code, read from torchrun's own failure record (`ChildFailedError.failures`) rather than
parsed from its log. Written by hand because torchrun has no option for it.

    python -m pixeldefend.launch --nproc-per-node 2 -m pixeldefend score images/ ...
"""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from typing import Any

from .gate import EXIT_USAGE


def exit_code_of(failures: Mapping[int, Any]) -> int:
    """The code to exit with, from torchrun's failed ranks (global rank -> failure with an
    `exitcode`). Rank 0's code wins: it decided the gate, and torchrun may stop the other
    ranks with a signal (a negative code) once one has exited. No positive code at all
    (every rank killed by a signal) is not a clean verdict: 2, so a CI gate fails closed."""
    codes = [int(failures[rank].exitcode) for rank in sorted(failures)]
    if 0 in failures and int(failures[0].exitcode) > 0:
        return int(failures[0].exitcode)
    return next((code for code in codes if code > 0), EXIT_USAGE)


def main(argv: Sequence[str] | None = None) -> int:
    """Run torchrun with `argv` (its own arguments) and return pixeldefend's exit code."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        run(args)
    except ChildFailedError as failed:
        return exit_code_of(failed.failures)
    return 0


if __name__ == "__main__":
    sys.exit(main())
