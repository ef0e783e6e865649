"""``python -m optax_path.experiments`` and ``optax-path``: the command line of :mod:`.cli`.

This module makes Ctrl-C end the command at any moment with one line and status 130, as
:func:`optax_path.experiments.cli.main` does once it runs. Two moments need help:

* while JAX starts (the first seconds, inside C++ code of imports) and the parser is
  built, where a ``KeyboardInterrupt`` gives a traceback or a crash in the interpreter's
  teardown;
* inside a garbage-collection callback (JAX registers one), where Python reports the
  ``KeyboardInterrupt`` as "ignored" and goes on: the run would finish as if never
  interrupted (seen here in 2 of 16 tries, 1 to 2.5 s into a run).
"""

import _thread
import os
import signal
import sys
import threading
from collections.abc import Sequence

#: Exit status after Ctrl-C (128 + SIGINT), as the shell gives.
INTERRUPTED = 130
#: Seconds before a swallowed Ctrl-C is delivered again (the callback has returned by then).
REDELIVERY_DELAY = 0.05


def _end_interrupted(*signal_args: object) -> None:
  """Prints one line and ends the process with status 130 (also a SIGINT handler)."""
  del signal_args
  command = ' '.join(['optax-path', *sys.argv[1:2]])
  os.write(2, f'\n{command}: interrupted\n'.encode())
  os._exit(INTERRUPTED)  # no teardown: JAX's threads may be half started


def _redeliver_swallowed_interrupt(unraisable: 'sys.UnraisableHookArgs') -> None:
  """``sys.unraisablehook``: a Ctrl-C that landed in a gc callback or ``__del__`` is sent again."""
  if issubclass(unraisable.exc_type, KeyboardInterrupt):
    timer = threading.Timer(REDELIVERY_DELAY, _thread.interrupt_main)
    timer.daemon = True
    timer.start()
  else:
    sys.__unraisablehook__(unraisable)


def main(argv: Sequence[str] | None = None) -> int:
  """Runs :func:`optax_path.experiments.cli.main`, with Ctrl-C handled from the first moment.

  Args:
    argv: Arguments (default: ``sys.argv[1:]``, the command line, which alone gets the
      handlers above: a caller from Python owns its signal handlers and hooks).

  Returns:
    The exit status of :func:`optax_path.experiments.cli.main`.
  """
  if argv is not None or signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
    # Called from Python, or Ctrl-C is ignored (`command &` in a script): left as it is.
    from optax_path.experiments import cli  # pylint: disable=import-outside-toplevel
    return cli.main(argv)
  sys.unraisablehook = _redeliver_swallowed_interrupt
  previous = signal.signal(signal.SIGINT, _end_interrupted)
  try:
    from optax_path.experiments import cli  # pylint: disable=import-outside-toplevel
  finally:
    signal.signal(signal.SIGINT, previous)
  try:
    return cli.main()
  except KeyboardInterrupt:  # before cli.main's own handling began (building the parser)
    _end_interrupted()
    raise


if __name__ == '__main__':
  sys.exit(main())
