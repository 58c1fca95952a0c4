"""The permission bits a written file gets: the old file's, else the umask's.

Outputs are written to a temporary file and renamed into place, and some
writers (`tempfile.mkstemp`, safetensors' `save_file`) create files 0600
whatever the umask. Either way the result must look like `open(path, 'w')`
made it: a re-saved file keeps its mode (a private 0600 adapter file stays
private), a new one gets `0o666 & ~umask`.

Standard library only, so the model loaders can use it too.
"""

from __future__ import annotations

import contextlib
import os
import stat

_PROC_STATUS = '/proc/self/status'


def umask() -> int:
  """The process umask, read without changing it where the OS allows.

  `os.umask` can only be read by setting it, and it is process-wide: a
  thread creating a file between the set and the restore would get the
  wrong mode. Linux (4.7+) reports it in /proc/self/status instead; the
  fallback sets the strictest mask meanwhile, so such a file errs private.

  Example:
    >>> 0 <= umask() <= 0o777
    True
  """
  with contextlib.suppress(OSError, ValueError):
    with open(_PROC_STATUS, encoding='ascii') as f:
      for line in f:
        if line.startswith('Umask:'):
          return int(line.split()[1], 8)
  mask = os.umask(0o077)
  os.umask(mask)
  return mask


def mode_for(path: str | os.PathLike[str]) -> int:
  """The replaced file's permission bits, else what `open` would give.

  Example:
    >>> import tempfile
    >>> with tempfile.NamedTemporaryFile() as f:
    ...   os.chmod(f.name, 0o640)
    ...   oct(mode_for(f.name))
    '0o640'
  """
  try:
    # Only rwx bits: set-id bits mean nothing on a data file.
    return stat.S_IMODE(os.stat(path).st_mode) & 0o777
  except FileNotFoundError:
    return 0o666 & ~umask()


def as_if_opened(path: str | os.PathLike[str]) -> None:
  """Gives a file its writer just created the mode `open` would have.

  For writers that create files 0600 (safetensors' `save_file`).
  """
  os.chmod(path, 0o666 & ~umask())
