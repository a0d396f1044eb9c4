"""The one exception type users see, and how entry points report it without a traceback."""
from __future__ import annotations

import sys
from contextlib import contextmanager
from typing import Iterator


class NnsslError(Exception):
    """Bad input or state a user can act on.

    The message says what was wrong, where (file, argument or variable), what was expected and
    what to run or change.
    """


@contextmanager
def exit_on_user_error(prog: str) -> Iterator[None]:
    """Print an NnsslError as ``<prog>: error: <message>`` on stderr and exit with status 2.

    Every command runs inside it, so it first refuses an environment where MIC-DKFZ's nnssl (same package
    name) is installed too (:mod:`nnssl.foreign`), before anything fails for that reason in obscure ways.
    """
    from nnssl.foreign import check_foreign_installation

    try:
        check_foreign_installation()
        yield
    except NnsslError as err:
        print(f"{prog}: error: {err}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
