"""JAX's persistent compilation cache, on by default for `python -m peft`.

A model's compiled programs (the training step, evaluation, sampling) are
written to disk, so a second run of a command skips most of its compile.
The cache lives in `$XDG_CACHE_HOME/peft/jax` (default
`~/.cache/peft/jax`); `PEFT_COMPILATION_CACHE=DIR` moves it and
`PEFT_COMPILATION_CACHE=off` turns it off. A `JAX_COMPILATION_CACHE_DIR`
or `JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS` set by the user is JAX's
own setting and wins. Deleting the directory is
always safe.
"""

from __future__ import annotations

from collections.abc import Mapping
import os
import pathlib

ENV = 'PEFT_COMPILATION_CACHE'
# Programs that compile faster than this are not worth a file each.
MIN_COMPILE_SECONDS = 0.2


def directory(environ: Mapping[str, str]) -> pathlib.Path | None:
  """Where the cache goes under `environ`, or None when it is off.

  Example:
    >>> directory({'HOME': '/home/ann'})
    PosixPath('/home/ann/.cache/peft/jax')
    >>> directory({'PEFT_COMPILATION_CACHE': '/tmp/c'}), directory(
    ...     {'PEFT_COMPILATION_CACHE': 'off'})
    (PosixPath('/tmp/c'), None)
  """
  value = environ.get(ENV, '')
  if value.lower() == 'off':
    return None
  if value:
    return pathlib.Path(value)
  home = environ.get('XDG_CACHE_HOME') or os.path.join(
      environ.get('HOME', os.path.expanduser('~')), '.cache')
  return pathlib.Path(home) / 'peft' / 'jax'


def enable(environ: Mapping[str, str] = os.environ) -> pathlib.Path | None:
  """Turns the cache on for this process; returns its directory (or None).

  Leaves JAX's configuration alone when `JAX_COMPILATION_CACHE_DIR` is set
  or the cache is already configured.
  """
  import jax  # pylint: disable=g-import-not-at-top

  # `jax.config.values` holds every option (the attributes are dynamic).
  configured = (environ.get('JAX_COMPILATION_CACHE_DIR')
                or jax.config.values.get('jax_compilation_cache_dir'))
  if configured:
    return pathlib.Path(configured)
  path = directory(environ)
  if path is not None:
    jax.config.update('jax_compilation_cache_dir', str(path))
    # A user's own threshold (JAX reads the variable itself) wins too.
    if 'JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS' not in environ:
      jax.config.update('jax_persistent_cache_min_compile_time_secs',
                        MIN_COMPILE_SECONDS)
  return path
