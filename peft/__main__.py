"""The main job: `python -m peft <command>` (see `--help`).

Commands: `finetune` (LoRA/QLoRA adapters on Shakespeare), `eval`
(held-out perplexity), `sample`, `merge` (fuse into plain params, checked),
`summary` (what surgery adapts), `demo` (all of them, as `make demo` runs
it) and `quickstart` (a small MLP in seconds). A mistake the user can fix
(a bad flag value, a missing or corrupt file, an adapter file made for
another model) prints one line and exits non-zero, and no output is
overwritten; `--debug` shows the traceback instead.
"""

from __future__ import annotations

import sys

from peft._cli import base as base_lib
from peft._cli import parser as parser_lib


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
  try:
    _, args = parser_lib.parse(argv)
  except SystemExit as e:  # --help, or a usage error argparse printed.
    return e.code if isinstance(e.code, int) else 0
  try:
    args.run(args)
  except KeyboardInterrupt:
    print(f'{parser_lib.PROG} {args.command}: interrupted', file=sys.stderr)
    return 130
  except (base_lib.CliError, ValueError, TypeError, OSError) as e:
    if args.debug:
      raise
    print(f'{parser_lib.PROG} {args.command}: error: {_one_line(e)}',
          file=sys.stderr)
    return 1
  return 0


if __name__ == '__main__':
  sys.exit(main())
