"""Ctrl-C in the main job: exit status 130 and one line, whenever it comes.

Python's own handling raises `KeyboardInterrupt` wherever the main thread
happens to be: inside an import (a traceback, or a half-initialized
extension that crashes the interpreter on its way out), or inside a
finalizer, where it is printed, ignored, and the run carries on. `install`
replaces it, in the `python -m peft` process only, with a handler that ends
the process at once: it removes the scratch directories of unfinished
writes (`scratch`), prints one line and exits with status 130 (128 +
SIGINT, as a shell reports it), skipping the interpreter's teardown.

`base.staged` writes each output into a scratch directory and moves it into
place by renames; while those run (`deferred`), an interrupt waits for them
to finish, so every output is the old one or the new one, complete. While
`finetune` trains (`stop_requests`), a first Ctrl-C only asks the loop to
stop after its step; it writes a checkpoint and calls `end_after_stop`. A
second Ctrl-C ends the run at once, as anywhere else.

Only the standard library is imported. Under `python -m peft`, importing
this module installs the handler (`install_for_cli`): `peft/__main__.py`
imports it before the CLI's modules, and `peft/__init__.py` can import it
first of all, before jax.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
import contextlib
import os
import pathlib
import shutil
import signal
import sys
import tempfile

from peft._cli import parser as parser_lib

STATUS = 130


class _State:
  """The process's interrupt state (one per process; signals are too)."""

  deferring = 0  # Depth of `deferred` blocks.
  pending = False  # A SIGINT came during a `deferred` block.
  stoppable = 0  # Depth of `stop_requests` blocks.
  stop_requested = False  # A first SIGINT came in a `stop_requests` block.
  ending = False  # `_end` has begun.
  scratch: set[str] = set()  # Live `scratch` directories.


# Replaced by tests, which cannot let the process end.
_hard_exit = os._exit


def message(command: str | None) -> str:
  """The line an interrupted run prints.

  Example:
    >>> message('finetune')
    'python -m peft finetune: interrupted'
  """
  return f'{parser_lib.PROG}{f" {command}" if command else ""}: interrupted'


def _command(argv: list[str]) -> str | None:
  # Before the command there are only top-level flags (--debug, --help).
  return next((a for a in argv if not a.startswith('-')), None)


def install() -> None:
  """Makes SIGINT end the process: status 130, one line, scratch removed.

  Idempotent; for the main thread of `python -m peft` only, since Ctrl-C
  belongs to the program, not to a library it imports (`install_for_cli`
  checks). A SIGINT the parent ignores (a shell's background job) stays
  ignored.
  """
  if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    return
  with contextlib.suppress(ValueError):  # Not the main thread: not ours.
    signal.signal(signal.SIGINT, _on_sigint)


def main_module(orig_argv: list[str]) -> str | None:
  """The module `python -m MODULE` runs, from the interpreter's arguments.

  Example:
    >>> main_module(['python', '-X', 'importtime', '-m', 'peft', 'eval'])
    'peft'
    >>> main_module(['python', '-m', 'pytest', '-m', 'peft']), main_module(
    ...     ['python', 'script.py', '-m', 'peft'])
    ('pytest', None)
  """
  args = iter(orig_argv[1:])
  for arg in args:
    if arg in ('-X', '-W'):  # Options that take a separate value.
      next(args, None)
    elif arg.startswith('-m'):
      return arg[2:] or next(args, None)
    elif arg.startswith('-c') or not arg.startswith('-') or arg == '-':
      return None
  return None


def install_for_cli() -> None:
  """`install`, when this process is `python -m peft` (else nothing).

  Run when this module is first imported, so that importing it first thing
  in `peft/__init__.py` (which `python -m peft` runs, importing jax and
  flax for seconds, before `peft/__main__.py`) covers those imports too.
  """
  if main_module(getattr(sys, 'orig_argv', [])) == 'peft':
    install()


def _on_sigint(signum, frame) -> None:
  del signum, frame
  if _State.deferring:
    _State.pending = True
  elif _State.stoppable and not _State.stop_requested:
    _State.stop_requested = True
    _write_line(STOPPING)
  else:
    _end()


def _write_line(line: str) -> None:
  with contextlib.suppress(OSError):
    os.write(2, (line + '\n').encode())


def _end(detail: str = '') -> None:
  if _State.ending:  # A second Ctrl-C while the first one ends the run.
    return
  _State.ending = True
  for path in list(_State.scratch):
    shutil.rmtree(path, ignore_errors=True)
  with contextlib.suppress(Exception):  # E.g. a write it interrupted.
    sys.stdout.flush()
  # On a terminal the ^C echo ends the current line (a progress bar's).
  _write_line(('\n' if os.isatty(2) else '') + message(_command(sys.argv[1:]))
              + detail)
  _hard_exit(STATUS)


STOPPING = ('Ctrl-C: stopping after this step to write a checkpoint (Ctrl-C '
            'again to quit without one)')


@contextlib.contextmanager
def stop_requests() -> Iterator[Callable[[], bool]]:
  """Turns a first SIGINT into a request that the block polls.

  Yields a function that says whether a stop was asked for, so a training
  loop can finish its step and write a checkpoint before calling
  `end_after_stop`. A second SIGINT ends the process at once, as outside
  the block. Where no handler is installed (a library caller), the
  request never comes and `KeyboardInterrupt` works as usual.

  Example:
    >>> with stop_requests() as requested:
    ...   requested()
    False
  """
  _State.stoppable += 1
  try:
    yield lambda: _State.stop_requested
  finally:
    _State.stoppable -= 1


def end_after_stop(detail: str) -> None:
  """Ends the process for a stop request: status 130, `detail` on the line.

  Like a SIGINT outside `stop_requests`: scratch directories go, one line
  (the usual one, then `detail`) goes to stderr.
  """
  _end(detail)


@contextlib.contextmanager
def deferred() -> Iterator[None]:
  """Holds a SIGINT back until the block ends; then it takes effect.

  For the few renames that swap an output into place, never for long work.
  """
  _State.deferring += 1
  try:
    yield
  finally:
    _State.deferring -= 1
    if not _State.deferring and _State.pending:
      _end()


@contextlib.contextmanager
def scratch(parent: pathlib.Path, prefix: str) -> Iterator[pathlib.Path]:
  """A new directory in `parent`, removed after the block or on SIGINT.

  Raises:
    OSError: `parent` does not exist or is not writable.

  Example:
    >>> with scratch(pathlib.Path(tempfile.gettempdir()), '.x.') as path:
    ...   path.is_dir()
    True
    >>> path.exists()
    False
  """
  with deferred():  # Created and registered, or neither.
    path = tempfile.mkdtemp(dir=parent, prefix=prefix)
    _State.scratch.add(path)
  try:
    yield pathlib.Path(path)
  finally:
    shutil.rmtree(path, ignore_errors=True)
    _State.scratch.discard(path)


install_for_cli()
