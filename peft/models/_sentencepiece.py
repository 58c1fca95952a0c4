"""SentencePiece BPE tokenizers (Kudo & Richardson 2018), offline.

Gemma, Llama 2 and Mistral ship a SentencePiece BPE vocabulary with byte
fallback: pieces spell text with '\u2581' for a space, every piece has a
score, and characters outside the vocabulary are written as UTF-8 byte
pieces '<0x00>'..'<0xFF>'. A GGUF file stores the pieces, scores and types
but no merge list; `tokenizer.model` (a protobuf) stores the same. BPE
merges the adjacent pair whose merged piece scores highest, so the merges
are recovered from the vocabulary: a normal piece that is the concatenation
of two normal pieces is a merge, ranked by its score. `sentencepiece_tokenizer`
builds our `Tokenizer` from those lists with the `tokenizers` package;
`read_sentencepiece_model` reads them from a `tokenizer.model` with a
minimal protobuf wire-format reader (no protobuf dependency).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
import dataclasses
import pathlib
import struct
from typing import Any

import tokenizers
from tokenizers import decoders
from tokenizers import models
from tokenizers import normalizers
from tokenizers import pre_tokenizers

from peft.models._tokenizer import Tokenizer

# SentencePiece piece types (sentencepiece_model.proto), which GGUF's
# `tokenizer.ggml.token_type` reuses.
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
TOKEN_TYPES = {NORMAL: 'normal', UNKNOWN: 'unknown', CONTROL: 'control',
               USER_DEFINED: 'user-defined', UNUSED: 'unused', BYTE: 'byte'}
SPACE = '\u2581'  # How SentencePiece spells ' ' inside a piece.
_BPE = 2  # TrainerSpec.model_type of a BPE model (UNIGRAM is 1).
_MODEL_TYPES = {1: 'UNIGRAM', 2: 'BPE', 3: 'WORD', 4: 'CHAR'}
_BYTE_PIECES = tuple(f'<0x{b:02X}>' for b in range(256))


def _derive_merges(tokens: Sequence[str], scores: Sequence[float],
                   token_types: Sequence[int]) -> list[tuple[str, str]]:
  """Merges, best first: every split of a normal piece into two normal ones.

  The rank is the merged piece's score (highest first, then the lower id);
  splits of one piece come longest left part first.
  """
  normal = {t for t, kind in zip(tokens, token_types) if kind == NORMAL}
  ranked = []
  for i, (piece, kind) in enumerate(zip(tokens, token_types)):
    if kind != NORMAL or len(piece) < 2:
      continue
    for cut in range(len(piece) - 1, 0, -1):
      left = piece[:cut]
      if left in normal and piece[cut:] in normal:
        ranked.append((-scores[i], i, -cut, left, piece[cut:]))
  ranked.sort()
  return [(left, right) for *_, left, right in ranked]


def _check_lists(tokens: Sequence[str], scores: Sequence[float],
                 token_types: Sequence[int]) -> None:
  if not len(tokens) == len(scores) == len(token_types):
    raise ValueError(
      f'SentencePiece tokens, scores and token_types must have one entry '
      f'per token; got {len(tokens)} tokens, {len(scores)} scores and '
      f'{len(token_types)} token_types. Pass the three lists of one '
      'vocabulary (GGUF tokenizer.ggml.tokens, .scores, .token_type).')
  bad = [(i, kind) for i, kind in enumerate(token_types)
         if kind not in TOKEN_TYPES]
  if bad:
    i, kind = bad[0]
    raise ValueError(
      f'token_types[{i}] (token {tokens[i]!r}) is {kind!r}, not a '
      f'SentencePiece piece type {sorted(TOKEN_TYPES)} '
      f'({", ".join(f"{k} {v}" for k, v in TOKEN_TYPES.items())}). Pass '
      "the vocabulary's own token types.")
  seen: dict[str, int] = {}
  for i, token in enumerate(tokens):
    if token in seen:
      raise ValueError(
        f'the SentencePiece vocabulary repeats token {token!r} (ids '
        f'{seen[token]} and {i}); each token must appear once.')
    seen[token] = i
  byte_pieces = [t for t, kind in zip(tokens, token_types) if kind == BYTE]
  if byte_pieces and sorted(byte_pieces) != sorted(_BYTE_PIECES):
    odd = sorted(set(byte_pieces) - set(_BYTE_PIECES))
    missing = sorted(set(_BYTE_PIECES) - set(byte_pieces))
    raise ValueError(
      f'byte fallback needs the 256 byte tokens <0x00>..<0xFF>; this '
      f'vocabulary marks {len(byte_pieces)} tokens as bytes '
      f'(unexpected: {odd[:3]!r}, missing: {missing[:3]!r}). Pass the '
      "vocabulary's own token types.")


def sentencepiece_tokenizer(
    *, tokens: Sequence[str], scores: Sequence[float],
    token_types: Sequence[int], eos_id: int, unk_id: int,
    bos_id: int | None = None, add_bos: bool = False,
    add_space_prefix: bool = False,
    default_system_prompt: str | None = None) -> Tokenizer:
  """A `Tokenizer` for a SentencePiece BPE vocabulary with byte fallback.

  Encodes as SentencePiece's BPE does: spaces become '\u2581', control
  tokens (`<bos>`, `<start_of_turn>`...) and user-defined ones ('\\n\\n',
  `<table>`...) written in the text are kept whole, the rest is merged pair
  by pair, the pair whose merged piece scores highest first, and a
  character outside the vocabulary becomes its UTF-8 byte tokens when the
  vocabulary has them (else `unk_id`). Decoding undoes all of that.

  Args:
    tokens: piece strings by id (GGUF `tokenizer.ggml.tokens`). A
      user-defined piece of spaces may be spelled with ' ' (as GGUF files
      do) or '\u2581'.
    scores: piece scores by id (`tokenizer.ggml.scores`).
    token_types: SentencePiece piece types by id (`tokenizer.ggml.
      token_type`): 1 normal, 2 unknown, 3 control, 4 user-defined,
      5 unused, 6 byte.
    eos_id: id that ends a sequence.
    unk_id: id of the unknown token.
    bos_id: id prepended when `add_bos`.
    add_bos: whether `encode` prepends `bos_id` by default.
    add_space_prefix: prepend '\u2581' to the text, as SentencePiece's
      `add_dummy_prefix` does (Llama 2: yes; Gemma: no).
    default_system_prompt: see `Tokenizer`.

  Returns:
    The tokenizer; `Tokenizer.chat_prompt` follows its vocabulary (Gemma
    turns when it has `<start_of_turn>`).

  Raises:
    ValueError: lists of different lengths, an unknown token type, a
      repeated token, an incomplete set of byte tokens, or an id outside
      the vocabulary.

  Example:
    >>> tokens = ['<unk>', '<bos>', '<eos>', 'a', 'b', '\u2581', 'ab',
    ...           '\u2581ab'] + [f'<0x{b:02X}>' for b in range(256)]
    >>> tok = sentencepiece_tokenizer(
    ...     tokens=tokens, scores=[0.0] * 5 + [-1.0, -2.0, -3.0] + [0.0] * 256,
    ...     token_types=[2, 3, 3] + [1] * 5 + [6] * 256,
    ...     eos_id=2, unk_id=0, bos_id=1, add_bos=True)
    >>> ids = tok.encode('ab ab!')
    >>> [tok.backend.id_to_token(i) for i in ids]
    ['<bos>', 'ab', '\u2581ab', '<0x21>']
    >>> tok.decode(ids)
    'ab ab!'
  """
  _check_lists(tokens, scores, token_types)
  n = len(tokens)
  if not 0 <= unk_id < n:
    raise ValueError(
      f'SentencePiece unk_id={unk_id!r} is outside the vocabulary of {n} '
      f'tokens. Pass an id in [0, {n}).')
  backend = tokenizers.Tokenizer(models.BPE(
    vocab={token: i for i, token in enumerate(tokens)},
    merges=_derive_merges(tokens, scores, token_types),
    unk_token=tokens[unk_id], fuse_unk=True,
    byte_fallback=BYTE in token_types))
  backend.normalizer = normalizers.Replace(' ', SPACE)
  steps: list[decoders.Decoder] = [
    decoders.Replace(SPACE, ' '), decoders.ByteFallback(), decoders.Fuse()]
  if add_space_prefix:
    backend.pre_tokenizer = pre_tokenizers.Metaspace(
      replacement=SPACE, prepend_scheme='first', split=False)
    steps.append(decoders.Strip(content=' ', left=1, right=0))
  backend.decoder = decoders.Sequence(steps)
  backend.add_special_tokens([
    tokenizers.AddedToken(t, special=True, normalized=False)
    for t, kind in zip(tokens, token_types) if kind in (CONTROL, UNKNOWN)])
  # normalized=True: matched in the text after ' ' -> '\u2581', so a piece
  # of spaces matches whether spelled ' ' (GGUF) or '\u2581' (SentencePiece).
  backend.add_tokens([
    tokenizers.AddedToken(t, special=False, normalized=True)
    for t, kind in zip(tokens, token_types) if kind == USER_DEFINED])
  return Tokenizer(backend, eos_id=eos_id, bos_id=bos_id, add_bos=add_bos,
                   default_system_prompt=default_system_prompt)


# --- tokenizer.model --------------------------------------------------------


@dataclasses.dataclass(frozen=True, kw_only=True)
class SentencePieceModel:
  """What a SentencePiece `tokenizer.model` says, as plain lists.

  Attributes:
    tokens: piece strings by id.
    scores: piece scores by id.
    token_types: piece types by id (1 normal ... 6 byte).
    model_type: the trainer's model type ('BPE', 'UNIGRAM', ...).
    unk_id: the unknown piece's id.
    bos_id: the begin-of-sequence id, or None (-1 in the file).
    eos_id: the end-of-sequence id, or None.
    pad_id: the padding id, or None.
    add_dummy_prefix: whether SentencePiece prepends '\u2581' to the text.
    normalizer: the normalization rule's name ('identity', 'nmt_nfkc'...).
    remove_extra_whitespaces: whether runs of spaces are squeezed.
    path: the file it was read from (named in errors).

  Example:
    >>> model = SentencePieceModel(
    ...     tokens=('<unk>', 'a'), scores=(0.0, -1.0), token_types=(2, 1),
    ...     model_type='BPE', unk_id=0, bos_id=None, eos_id=0, pad_id=None,
    ...     add_dummy_prefix=False, normalizer='identity',
    ...     remove_extra_whitespaces=False)
    >>> model.tokenizer().encode('aa')
    [1, 1]
  """

  tokens: tuple[str, ...]
  scores: tuple[float, ...]
  token_types: tuple[int, ...]
  model_type: str
  unk_id: int
  bos_id: int | None
  eos_id: int | None
  pad_id: int | None
  add_dummy_prefix: bool
  normalizer: str
  remove_extra_whitespaces: bool
  path: str = '<memory>'

  def tokenizer(self, *, eos_id: int | None = None,
                bos_id: int | None = None, add_bos: bool = False,
                default_system_prompt: str | None = None) -> Tokenizer:
    """`sentencepiece_tokenizer` for this model.

    Args:
      eos_id: overrides the model's eos id (HF `config.json` says it).
      bos_id: overrides the model's bos id.
      add_bos: whether `encode` prepends the bos id by default.
      default_system_prompt: see `Tokenizer`.

    Raises:
      ValueError: a model our tokenizer would not reproduce (not BPE, a
        normalization other than 'identity', squeezed spaces), or no eos.
    """
    where = f'SentencePiece model {self.path!r}'
    if self.model_type != 'BPE':
      raise ValueError(
        f'{where} is a {self.model_type} model; only BPE models are '
        "supported. Load the model's tokenizer.json instead.")
    if self.normalizer not in ('identity', '') or self.remove_extra_whitespaces:
      raise ValueError(
        f'{where} normalizes text (rule {self.normalizer!r}, '
        f'remove_extra_whitespaces={self.remove_extra_whitespaces}), which '
        "is not supported. Load the model's tokenizer.json instead.")
    eos_id = self.eos_id if eos_id is None else eos_id
    if eos_id is None:
      raise ValueError(
        f'{where} has no eos id (-1) and none was given. Pass eos_id.')
    return sentencepiece_tokenizer(
      tokens=self.tokens, scores=self.scores, token_types=self.token_types,
      eos_id=eos_id, unk_id=self.unk_id,
      bos_id=self.bos_id if bos_id is None else bos_id, add_bos=add_bos,
      add_space_prefix=self.add_dummy_prefix,
      default_system_prompt=default_system_prompt)


class _WireError(ValueError):
  pass


def _varint(data: bytes, pos: int) -> tuple[int, int]:
  value = shift = 0
  while True:
    if pos >= len(data):
      raise _WireError(f'a varint runs past the end at byte {pos}')
    byte = data[pos]
    pos += 1
    value |= (byte & 0x7F) << shift
    if not byte & 0x80:
      return value, pos
    shift += 7
    if shift >= 70:
      raise _WireError(f'a varint is longer than 10 bytes at byte {pos}')


def _fields(data: bytes) -> Iterator[tuple[int, int, Any]]:
  """(field number, wire type, value) of each field of a message."""
  pos = 0
  while pos < len(data):
    key, pos = _varint(data, pos)
    number, wire = key >> 3, key & 7
    if wire == 0:
      value, pos = _varint(data, pos)
    elif wire in (1, 5):
      size = 8 if wire == 1 else 4
      value, pos = data[pos:pos + size], pos + size
      if len(value) != size:
        raise _WireError(f'field {number} runs past the end')
    elif wire == 2:
      size, pos = _varint(data, pos)
      value, pos = data[pos:pos + size], pos + size
      if len(value) != size:
        raise _WireError(
          f'field {number} needs {size} bytes; the message ends first')
    else:
      raise _WireError(f'field {number} has wire type {wire}, which a '
                       'SentencePiece model does not use')
    if number == 0:
      raise _WireError(f'a field numbered 0 at byte {pos}')
    yield number, wire, value


def _int32(value: int) -> int:
  return value - (1 << 64) if value >= 1 << 63 else value


def _message(data: bytes, wanted: dict[int, int]) -> dict[int, Any]:
  """The last value of each field in `wanted` (number -> wire type)."""
  out: dict[int, Any] = {}
  for number, wire, value in _fields(data):
    if number in wanted:
      if wire != wanted[number]:
        raise _WireError(f'field {number} has wire type {wire}; expected '
                         f'{wanted[number]}')
      out[number] = value
  return out


def _parse_model(data: bytes, path: str) -> SentencePieceModel:
  tokens, scores, types = [], [], []
  trainer, normalizer = b'', b''
  for number, wire, value in _fields(data):
    if number == 1 and wire == 2:  # repeated SentencePiece pieces
      piece = _message(value, {1: 2, 2: 5, 3: 0})
      tokens.append(bytes(piece.get(1, b'')).decode('utf-8'))
      scores.append(struct.unpack('<f', piece.get(2, b'\0' * 4))[0])
      types.append(piece.get(3, NORMAL))
    elif number == 2 and wire == 2:
      trainer = value
    elif number == 3 and wire == 2:
      normalizer = value
  if not tokens:
    raise _WireError('it holds no pieces')
  spec = _message(trainer, {3: 0, 40: 0, 41: 0, 42: 0, 43: 0})
  norm = _message(normalizer, {1: 2, 3: 0, 4: 0})

  def optional_id(number, default):
    value = _int32(spec.get(number, default))
    return None if value < 0 else value

  model_type = spec.get(3, 1)
  return SentencePieceModel(
    tokens=tuple(tokens), scores=tuple(scores), token_types=tuple(types),
    model_type=_MODEL_TYPES.get(model_type, f'type {model_type}'),
    unk_id=_int32(spec.get(40, 0)), bos_id=optional_id(41, 1),
    eos_id=optional_id(42, 2), pad_id=optional_id(43, -1),
    add_dummy_prefix=bool(norm.get(3, True)),
    normalizer=bytes(norm.get(1, b'')).decode('utf-8'),
    remove_extra_whitespaces=bool(norm.get(4, True)), path=path)


def read_sentencepiece_model(path: str | pathlib.Path) -> SentencePieceModel:
  """Reads the pieces and special ids of a SentencePiece `tokenizer.model`.

  Args:
    path: the `tokenizer.model` file (a serialized `ModelProto`).

  Returns:
    The model's pieces, scores, types and settings; `.tokenizer()` builds
    the `Tokenizer`.

  Raises:
    FileNotFoundError: no such file.
    ValueError: the file is not a SentencePiece model (truncated, another
      format, or no pieces).

  Example:
    >>> import tempfile, pathlib
    >>> def piece(text, score, kind):  # A ModelProto.SentencePiece message.
    ...   body = (b'\\x0a' + bytes([len(text)]) + text.encode()
    ...           + b'\\x15' + struct.pack('<f', score) + b'\\x18'
    ...           + bytes([kind]))
    ...   return b'\\x0a' + bytes([len(body)]) + body
    >>> path = pathlib.Path(tempfile.mkdtemp()) / 'tokenizer.model'
    >>> _ = path.write_bytes(piece('<unk>', 0.0, 2) + piece('a', -1.0, 1))
    >>> model = read_sentencepiece_model(path)
    >>> model.tokens, model.scores, model.token_types
    (('<unk>', 'a'), (0.0, -1.0), (2, 1))
  """
  path = pathlib.Path(path)
  if not path.is_file():
    raise FileNotFoundError(
      f'no SentencePiece model at {str(path)!r}. Pass the path of a '
      'tokenizer.model file.')
  try:
    return _parse_model(path.read_bytes(), str(path))
  except (_WireError, UnicodeDecodeError) as e:
    raise ValueError(
      f'{str(path)!r} is not a readable SentencePiece model ({e}). '
      "Replace it with the model's own tokenizer.model.") from e
