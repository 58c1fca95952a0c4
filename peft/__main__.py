"""The main job: `python -m peft <command>` (see `--help`).

Commands: `finetune` (LoRA/QLoRA adapters on your data or Shakespeare), `eval`
(held-out perplexity), `sample`, `merge` (fuse into plain params, checked),
`summary` (what surgery adapts), `demo` (all of them, as `make demo` runs
it) and `quickstart` (a small MLP in seconds). A mistake the user can fix
(a bad flag value, a missing or corrupt file, an output that cannot be
written, an adapter file made for another model) prints one line and exits
non-zero before any long work, and no output is overwritten; `--debug`
shows the traceback instead. Ctrl-C prints one line and exits 130, leaving
every output whole (`peft._cli.interrupt`); in training it first finishes
the step and writes a resumable checkpoint. JAX's persistent compilation
cache is on (`peft._cli.compile_cache`), and XLA runs with
`peft._cli.xla_flags`.
"""

from __future__ import annotations

import sys

# Only the standard library: the Ctrl-C handling goes in before the rest.
from peft._cli import interrupt


def _one_line(error: BaseException) -> str:
  return ' '.join(str(error).split()) or type(error).__name__


def main(argv: list[str] | None = None) -> int:
  """Runs one command; returns the exit status (0 on success).

  Args:
    argv: the arguments after `python -m peft` (default: `sys.argv[1:]`).

  Returns:
    0 on success, 1 for an error in the run, 2 for bad flags, 130 when
    interrupted.
  """
  # pylint: disable=g-import-not-at-top
  from peft._cli import base as base_lib
  from peft._cli import parser as parser_lib
  # pylint: enable=g-import-not-at-top

  try:
    _, args = parser_lib.parse(argv)
  except SystemExit as e:  # --help, or a usage error argparse printed.
    return e.code if isinstance(e.code, int) else 0
  try:
    args.run(args)
  except KeyboardInterrupt:  # In-process callers; `python -m` never gets it.
    print(interrupt.message(args.command), file=sys.stderr)
    return interrupt.STATUS
  except (base_lib.CliError, ValueError, TypeError, OSError) as e:
    if args.debug:
      raise
    print(f'{parser_lib.PROG} {args.command}: error: {_one_line(e)}',
          file=sys.stderr)
    return 1
  return 0


if __name__ == '__main__':
  interrupt.install()
  # Only here, not in `main`: in-process callers (tests, notebooks) keep
  # their own JAX configuration.
  # pylint: disable=g-import-not-at-top
  from peft._cli import compile_cache
  from peft._cli import xla_flags
  # pylint: enable=g-import-not-at-top
  xla_flags.apply()  # before any JAX work: XLA reads them once
  compile_cache.enable()
  sys.exit(main())
