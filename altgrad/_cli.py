"""The `altgrad` command line's entry point: the commands (`altgrad._commands`) under a Ctrl-C
that stops them cleanly (`altgrad._interrupt`), and errors as one line and an exit status."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from altgrad import _interrupt

#: Exit status of a command refused or failed with an error it names.
ERROR = 2


def main(argv: Sequence[str] | None = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  command = next((a for a in argv if not a.startswith("-")), "altgrad")
  with _interrupt.caught():
    try:
      from altgrad import _commands  # JAX and the rest load here, after Ctrl-C is taken over

      _interrupt.check()  # a Ctrl-C while importing: stop before loading any data
      status = _commands.main(argv)
    except KeyboardInterrupt:
      status = _interrupt.INTERRUPTED
    except (ValueError, OSError, ConnectionError) as error:
      print(f"altgrad {command}: error: {error}", file=sys.stderr)
      return ERROR
  if _interrupt.requested():
    print(f"altgrad {command}: interrupted; kept: {_interrupt.kept()}", file=sys.stderr)
    return _interrupt.INTERRUPTED
  return status
