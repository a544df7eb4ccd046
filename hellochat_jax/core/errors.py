"""The project's error for mistakes in what a user gave it.

A bad checkpoint, config, audio file, manifest or argument raises a subclass of `UserError`;
the command line (`hellochat_jax.cli.main`) prints its message as one `error: ...` line and
exits 1, without a traceback (``hellochat --debug ...`` shows it). Anything else is a bug and
keeps its traceback.
"""

from __future__ import annotations


class UserError(ValueError):
    """A problem with the user's input; the message alone must say what to fix."""
