"""What the ``canon-*`` commands share: errors a user can fix become one line on stderr and exit status 2."""

from __future__ import annotations

import sys
from collections.abc import Callable

__all__ = ["EXIT_USER_ERROR", "run_reporting_errors"]

EXIT_USER_ERROR = 2


def run_reporting_errors(body: Callable[[], int]) -> int:
    """``body()``, with a bad config (:class:`~canon_jax.train.config.ConfigError`), a bad run directory or step
    (:class:`~canon_jax.train.export.RunError`) or a busy workdir (:class:`~canon_jax.train.workdir.WorkdirBusy`)
    printed as ``config error: ...`` / ``error: ...`` and returned as exit status 2."""
    from canon_jax.train.config import ConfigError

    try:
        return body()
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    except Exception as e:
        # imported only now: importing jax (which these modules do) loads its plugins, whose start-up logging would
        # precede a config error's one line
        from canon_jax.train.export import RunError
        from canon_jax.train.workdir import WorkdirBusy

        if not isinstance(e, (RunError, WorkdirBusy)):
            raise
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
