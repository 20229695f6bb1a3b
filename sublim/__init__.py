"""sublim: subliminal-learning experiments as declarative Hydra sweeps."""

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager


class SublimError(Exception):
    """A problem with the user's input or environment, with the fix in its message.

    The entry point prints only the message (no stack trace) and exits non-zero; finished stages
    stay in the store, so rerunning after the fix resumes.
    """


@contextmanager
def quiet_on_closed_pipe() -> Iterator[None]:
    """End a command line like ``ls`` does (exit 141, no traceback) when ``... | head`` stops reading.

    stdout is flushed inside the block, where a closed pipe can still be caught, not at interpreter exit.
    """
    try:
        yield
        sys.stdout.flush()
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # the exit-time flush must not fail again
        raise SystemExit(141) from None
