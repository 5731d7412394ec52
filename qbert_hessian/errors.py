"""The one exception type for input a user can get wrong.

The CLI turns a :class:`QBHError` into one line on stderr and exit code 2; anything else is a bug and
crashes with its traceback (exit code 1).
"""

from __future__ import annotations


class QBHError(ValueError):
    """Bad user input: the message names the bad value, the valid ones and the fix."""
