"""User-facing errors: one clear line, exit code 2, no traceback."""
from __future__ import annotations

import functools
import sys

USAGE_EXIT_CODE = 2


class UserError(Exception):
    """A problem with the user's input (recipe, data, checkpoint, CLI); printed as one line."""


class RecipeError(UserError):
    """A recipe file or override that does not fit schema v2."""


class DataError(UserError):
    """A dataset or prompt file that cannot be read or does not fit the schema."""


class CheckpointError(UserError):
    """A checkpoint folder that is missing, partial, or does not match the recipe."""


class TrainingAborted(UserError):
    """Training stopped on purpose (e.g. the non-finite policy); exit code 3, the last checkpoint is intact."""

    exit_code = 3


class Interrupted(Exception):
    """SIGTERM or SIGINT (Ctrl-C) before training started: nothing to save; one line, exit 128 + signal."""

    def __init__(self, signum: int):
        import signal

        self.exit_code = 128 + signum
        super().__init__(f"interrupted by {signal.Signals(signum).name} before training started; nothing was "
                         f"saved or changed")


def exit_on_user_error(fn):
    """Decorate a CLI `main`: a UserError prints `error: <message>` on stderr and exits 2; an interrupt before
    any work prints one line and exits 130 (Ctrl-C) or 143 (SIGTERM), without a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserError as exc:
            message = " ".join(str(exc).split("\n"))
            print(f"error: {message}", file=sys.stderr, flush=True)
            sys.exit(getattr(exc, "exit_code", USAGE_EXIT_CODE))
        except KeyboardInterrupt:
            print("interrupted (Ctrl-C)", file=sys.stderr, flush=True)
            sys.exit(130)
        except Interrupted as exc:
            print(str(exc), file=sys.stderr, flush=True)
            sys.exit(exc.exit_code)

    return wrapper
