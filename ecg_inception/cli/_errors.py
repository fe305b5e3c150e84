"""How the Hydra console scripts end: the library's own errors as one line and exit status 2; a run that diverged
or failed exits 1 (a multirun job returns instead, so that the sweep goes on)."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator

from ecg_inception.errors import EcgInceptionError

#: Exit status of a configuration or usage error (the message alone on stderr).
USAGE_ERROR = 2
#: Exit status of a single run whose metrics.json status is not `ok`.
RUN_NOT_OK = 1


def full_error_requested() -> bool:
    """HYDRA_FULL_ERROR=1: show the whole traceback instead of the message alone."""
    return os.environ.get("HYDRA_FULL_ERROR", "").strip() == "1"


@contextlib.contextmanager
def library_errors(prog: str) -> Iterator[None]:
    """Turn an `EcgInceptionError` into `prog: error: <message>` on stderr and `SystemExit(2)`.

    Args:
        prog: the console script's name, printed before the message.

    Raises:
        SystemExit: with status 2 on a library error (unless HYDRA_FULL_ERROR=1, which re-raises it).
    """
    try:
        yield
    except EcgInceptionError as err:
        if full_error_requested():
            raise
        print(f"{prog}: error: {err}", file=sys.stderr)
        raise SystemExit(USAGE_ERROR) from None


def in_multirun() -> bool:
    """True inside a job of a Hydra multirun (sweep)."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN
    except (ImportError, ValueError):
        return False


def finish_run(prog: str, status: str, error: str | None) -> None:
    """Report a run that is not `ok` on stderr; a single run then exits 1, a sweep job returns."""
    if status == "ok":
        return
    print(f"{prog}: run {status}: {error or 'see metrics.json'}", file=sys.stderr)
    if not in_multirun():
        raise SystemExit(RUN_NOT_OK)
