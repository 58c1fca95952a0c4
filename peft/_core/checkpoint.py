"""Adapter-only checkpoints: safetensors tensors plus JSON metadata.

A file holds the A and B factors of every adapter (and a DoRA adapter's
magnitude `m`), keyed `'<module path>/<adapter name>/a'` (e.g.
`'block/attn/q/lora/a'`), and in the
safetensors header metadata: the format name and version, each adapter's
`AdapterSpec` (rank, alpha, rsLoRA, einsum and delta equations, shapes), the
tensors' dtypes and SHA-256 digests, the caller's own metadata (rules,
targets, ...), and a SHA-256 of all of those (`header_sha256`), so a
corrupt header is refused like a corrupt tensor. No pickle: loading never
runs code. The digests detect corruption, not forgery: whoever writes a
file can recompute them (the spec values are validated all the same).

Writes are atomic (a temporary file in the same directory, then
`os.replace`) and keep the mode of the file they replace, and loading
validates everything before returning anything.
A typical restore into a model adapted by surgery:

    lora, specs, meta = load_adapters(path, expected=report.specs)
    check_adapters_match(lora, params)          # params from model.init
    params = merge_params(split_params(params).original, lora)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
import contextlib
import hashlib
import json
import os
import re
import struct
import tempfile
from typing import Any, BinaryIO, NamedTuple
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import safetensors

from peft._core import adapter_tree as _adapter_tree
from peft._core import file_modes as _file_modes
from peft._core import params as _params
from peft._core import spec as _spec

FORMAT = 'peft.lora_adapters'
# 2 added `header_sha256`. Version 1 files (the same fields without it)
# are still read, with a warning: refusing them would strand adapters
# that can only be re-saved after being loaded.
FORMAT_VERSION = 2
_READABLE_VERSIONS = ('1', '2')
_HEADER_DIGEST = 'header_sha256'

# safetensors dtype codes of the float dtypes adapters may use.
_DTYPES = {'F16': np.dtype(np.float16), 'BF16': np.dtype(jnp.bfloat16),
           'F32': np.dtype(np.float32), 'F64': np.dtype(np.float64)}
_CODES = {dtype: code for code, dtype in _DTYPES.items()}


class LoadedAdapters(NamedTuple):
  """What `load_adapters` returns.

  A named tuple, so `lora, specs, metadata = load_adapters(path)` works.

  Example:
    >>> import os, tempfile
    >>> import jax, jax.numpy as jnp
    >>> from flax import linen as nn
    >>> import peft
    >>> model = nn.Sequential([nn.Dense(2)])
    >>> with peft.lora(rank=1) as report:
    ...   params = model.init(jax.random.key(0), jnp.ones((1, 3)))['params']
    >>> path = os.path.join(tempfile.mkdtemp(), 'adapters.safetensors')
    >>> peft.save_adapters(path, params, report.specs, metadata={'rank': 1})
    >>> loaded = peft.load_adapters(path)
    >>> jax.tree.map(jnp.shape, loaded.lora)
    {'layers_0': {'lora': {'a': (3, 1), 'b': (1, 2)}}}
    >>> [s.key for s in loaded.specs], loaded.metadata
    (['layers_0/lora'], {'rank': 1})

  Attributes:
    lora: the adapter branches as a nested dict (`merge_params`-ready).
    specs: the `AdapterSpec` of every adapter, in file order.
    metadata: the caller's metadata given to `save_adapters` (`{}` if none).
  """

  lora: dict[str, Any]
  specs: tuple[_spec.AdapterSpec, ...]
  metadata: dict[str, Any]


def _write(f: BinaryIO, data: bytes) -> None:
  f.write(data)


def _tensor_names(spec: _spec.AdapterSpec) -> tuple[str, ...]:
  return tuple(f'{spec.key}/{k}' for k in _adapter_tree.adapter_keys(spec))


def _header_digest(meta: Mapping[str, Any]) -> str:
  """SHA-256 of every metadata field but the digest, canonically serialised.

  It covers the format and version, the specs, the tensors' dtypes and
  digests and the user metadata; with the tensor digests it covers every
  byte that `load_adapters` uses (the tensor index beside it in the
  safetensors header is checked against the specs and dtypes). Sorted keys
  and ASCII escapes make it independent of how the JSON was laid out.
  """
  fields = {k: v for k, v in meta.items() if k != _HEADER_DIGEST}
  text = json.dumps(fields, sort_keys=True, ensure_ascii=True,
                    separators=(',', ':'))
  return hashlib.sha256(text.encode('ascii')).hexdigest()


def save_adapters(path: str | os.PathLike[str], params_or_lora_tree: Any,
                  adapters: Sequence[_spec.AdapterSpec], *,
                  metadata: Mapping[str, Any] | None = None) -> None:
  """Saves the adapters described by `adapters` to a safetensors file.

  Only the adapter branches are written, never the base weights. The write
  is atomic: a crash leaves either the old file or the new one under `path`.
  A replaced file keeps its permission bits; a new one gets
  `0o666 & ~umask`, as `open` would give it.

  Example:
    >>> import tempfile, os
    >>> import peft
    >>> spec = peft.AdapterSpec(
    ...     path=('dense',), layer_type='Dense', weight_name='kernel',
    ...     adapter_name='lora', weight_shape=(3, 2), a_shape=(3, 1),
    ...     b_shape=(1, 2), delta_str='ir,ro->io', rank=1)
    >>> params = {'dense': {'kernel': jnp.ones((3, 2)), 'lora': {
    ...     'a': jnp.ones((3, 1)), 'b': jnp.zeros((1, 2))}}}
    >>> path = os.path.join(tempfile.mkdtemp(), 'adapters.safetensors')
    >>> save_adapters(path, params, [spec], metadata={'targets': 'dense'})
    >>> lora, specs, meta = load_adapters(path, expected=[spec])
    >>> jax.tree.map(jnp.shape, lora), meta
    ({'dense': {'lora': {'a': (3, 1), 'b': (1, 2)}}}, {'targets': 'dense'})

  Args:
    path: the file to write (conventionally `*.safetensors`).
    params_or_lora_tree: params holding the adapter branches (merged with
      the base or `split_params(...).lora`).
    adapters: the spec of every adapter branch in the tree.
    metadata: JSON-serialisable user metadata (rules, targets, ...).

  Raises:
    TypeError: `metadata` is not JSON-serialisable, or `adapters` is not a
      sequence of AdapterSpec.
    ValueError: no specs, the tree and specs disagree, or an adapter is
      not float16/bfloat16/float32/float64.
  """
  name = 'save_adapters'
  specs = _adapter_tree.check_specs(adapters, name)
  if not specs:
    raise ValueError(
        f'{name}: adapters is empty; there is nothing to save. Pass the '
        'specs of the trained adapters (report.specs, filled when the model '
        'runs under peft.lora).'
    )
  _params.check_mapping(params_or_lora_tree, 'params_or_lora_tree')
  _adapter_tree.check_covered(params_or_lora_tree, specs, name)
  tensors, digests, stored_specs = {}, {}, []
  for spec in specs:
    # A '/' in a path element is refused when the spec is built.
    a, b, m, stored = _adapter_tree.adapter_arrays(params_or_lora_tree,
                                                   spec, name)
    stored_specs.append(stored)
    values = (a, b) if m is None else (a, b, m)
    for tensor_name, x in zip(_tensor_names(spec), values):
      arr = np.ascontiguousarray(np.asarray(x))
      if arr.dtype not in _CODES:
        raise ValueError(
            f'{name}: {tensor_name!r} has dtype {arr.dtype}; adapters must '
            'be float16, bfloat16, float32 or float64. Cast it first.'
        )
      tensors[tensor_name] = arr
      digests[tensor_name] = hashlib.sha256(arr.tobytes()).hexdigest()
  try:
    user = json.dumps({} if metadata is None else dict(metadata))
  except (TypeError, ValueError) as e:
    raise TypeError(
        f'{name}: metadata must be JSON-serialisable; {e}. Pass strings, '
        'numbers, lists and dicts.'
    ) from e
  header = {
      'format': FORMAT,
      'format_version': str(FORMAT_VERSION),
      'adapters': json.dumps([s.to_json() for s in stored_specs]),
      'dtypes': json.dumps({k: _CODES[v.dtype] for k, v in tensors.items()}),
      'sha256': json.dumps(digests),
      'user_metadata': user,
  }
  header[_HEADER_DIGEST] = _header_digest(header)
  data = bytes(safetensors.serialize(
      {k: safetensors.TensorSpec(dtype=v.dtype.name, shape=list(v.shape),
                                 data_ptr=v.ctypes.data, data_len=v.nbytes)
       for k, v in tensors.items()},
      metadata=header))
  _atomic_write(os.fspath(path), data)


def _atomic_write(path: str, data: bytes) -> None:
  directory = os.path.dirname(os.path.abspath(path))
  fd, tmp = tempfile.mkstemp(dir=directory, suffix='.tmp',
                             prefix=f'.{os.path.basename(path)}.')
  try:
    with os.fdopen(fd, 'wb') as f:
      _write(f, data)
      f.flush()
      os.fsync(f.fileno())
    # mkstemp makes the file 0600 whatever the umask.
    os.chmod(tmp, _file_modes.mode_for(path))
    os.replace(tmp, path)
  except BaseException:
    with contextlib.suppress(FileNotFoundError):
      os.remove(tmp)
    raise
  # The rename is durable only once the directory is on disk too. Not every
  # OS can open a directory (Windows): then this is best effort.
  with contextlib.suppress(OSError):
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
      os.fsync(dir_fd)
    finally:
      os.close(dir_fd)


def _corrupt(path: str, why: str) -> ValueError:
  return ValueError(
      f'load_adapters: {path!r} is not a valid adapter file: {why}. The file '
      'is truncated or corrupt, or was not written by save_adapters; '
      'save it again.'
  )


# What every tensor of a Hugging Face PEFT adapter file is named like.
_HF_PEFT_TENSOR = re.compile(r'^base_model\.model\..*\.lora_[AB]\.weight$')


def _is_hf_peft(header: Any) -> bool:
  names = [k for k in header if k != '__metadata__'] if isinstance(
      header, dict) else []
  return bool(names) and all(_HF_PEFT_TENSOR.match(n) for n in names)


def _hf_peft_file(path: str) -> ValueError:
  directory = os.path.dirname(os.path.abspath(path)) if os.path.isfile(
      path) else path
  return ValueError(
      f'load_adapters: {path!r} is a Hugging Face PEFT adapter, not a peft '
      'adapter file. Load its directory with peft.models.load_hf_peft('
      f'{directory!r}, config) for the reference decoder (the CLI takes it '
      'as --adapters DIR).'
  )


def _read_metadata(path: str, data: bytes) -> dict[str, str]:
  """The safetensors header's `__metadata__`, checked for our format."""
  if len(data) < 8:
    raise _corrupt(path, f'{len(data)} bytes is shorter than the header size')
  (size,) = struct.unpack('<Q', data[:8])
  if size > len(data) - 8:
    raise _corrupt(path, f'header of {size} bytes but the file has '
                   f'{len(data) - 8} more')
  try:
    header = json.loads(data[8:8 + size])
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise _corrupt(path, f'header is not JSON ({e})') from e
  meta = header.get('__metadata__') if isinstance(header, dict) else None
  if _is_hf_peft(header):
    raise _hf_peft_file(path)
  if not isinstance(meta, dict) or meta.get('format') != FORMAT:
    raise _corrupt(path, f'no {FORMAT!r} metadata in the header')
  version = meta.get('format_version')
  if version not in _READABLE_VERSIONS:
    raise ValueError(
        f'load_adapters: {path!r} has format version {version!r}; this peft '
        f'reads versions {", ".join(_READABLE_VERSIONS)}. Upgrade peft, or '
        're-save the adapters with this version.'
    )
  # Checked before any field is parsed: a corrupt field is reported as
  # corruption, not as whatever its corrupt value happens to look like.
  digest = meta.get(_HEADER_DIGEST)
  if version == '1':
    if digest is not None:
      raise _corrupt(path, f'it says format version 1, which has no '
                     f'{_HEADER_DIGEST!r}, yet holds one (a corrupt version '
                     'field)')
    warnings.warn(
        f'load_adapters: {path!r} is a version 1 adapter file, whose header '
        '(specs, dtypes, digests, metadata) has no integrity check; its '
        'tensors and spec values are still checked. Save it again with '
        'save_adapters to protect the header.', UserWarning, stacklevel=3)
  elif digest != _header_digest(meta):
    raise _corrupt(path, f'the header fails its integrity check (its '
                   f'{_HEADER_DIGEST!r} is {digest!r:.20}, not the SHA-256 '
                   'of its fields)')
  return meta


def _json_field(path: str, meta: dict[str, str], key: str,
                kind: type[list] | type[dict]) -> Any:
  try:
    value = json.loads(meta[key])
  except (KeyError, TypeError, json.JSONDecodeError) as e:
    raise _corrupt(path, f'metadata field {key!r} is missing or not JSON '
                   f'({e!r})') from e
  if not isinstance(value, kind):
    raise _corrupt(path, f'metadata field {key!r} is a '
                   f'{type(value).__name__}, not a {kind.__name__}')
  return value


def _parse_specs(path: str, meta: dict[str, str]):
  raw = _json_field(path, meta, 'adapters', list)
  try:
    specs = tuple(_spec.AdapterSpec.from_json(d) for d in raw)
    return _adapter_tree.check_specs(specs, 'load_adapters')
  except (TypeError, ValueError) as e:
    raise _corrupt(path, f'bad adapter specs ({e})') from e


def load_adapters(path: str | os.PathLike[str], *,
                  expected: Sequence[_spec.AdapterSpec] | None = None
                  ) -> LoadedAdapters:
  """Loads and validates a file written by `save_adapters`.

  Nothing is returned unless the whole file checks out: the format and
  version, the header's digest, every spec (as `AdapterSpec` validates
  it), every tensor's presence, shape, dtype and digest, and, with
  `expected`, the same adapters as `expected` with matching specs
  (`AdapterSpec.differences`: a linen file matches the nnx model it was
  made from, and back). The arrays are bit-identical to those saved
  (bfloat16 included). A version 1 file, whose header has no digest, is
  read with a warning.

  Example:
    >>> import os, tempfile
    >>> import jax, jax.numpy as jnp
    >>> from flax import linen as nn
    >>> import peft
    >>> model = nn.Sequential([nn.Dense(2)])
    >>> with peft.lora(rank=1) as report:
    ...   params = model.init(jax.random.key(0), jnp.ones((1, 3)))['params']
    >>> path = os.path.join(tempfile.mkdtemp(), 'adapters.safetensors')
    >>> peft.save_adapters(path, params, report.specs)
    >>> lora, specs, meta = peft.load_adapters(path, expected=report.specs)
    >>> peft.check_adapters_match(lora, params)
    >>> restored = peft.merge_params(peft.split_params(params).original, lora)
    >>> bool(jnp.all(restored['layers_0']['lora']['a']
    ...               == params['layers_0']['lora']['a']))
    True
    >>> with peft.lora(rank=2) as other:  # another rank: refused
    ...   _ = model.init(jax.random.key(0), jnp.ones((1, 3)))
    >>> peft.load_adapters(path, expected=other.specs)
    Traceback (most recent call last):
    ValueError: load_adapters: adapter 'layers_0/lora' in '...' differs from
    the expected spec: {'a_shape': ((3, 1), (3, 2)), ...

  Args:
    path: the file.
    expected: the specs the file must hold exactly (e.g. `report.specs`
      of the model the adapters are for).

  Returns:
    `LoadedAdapters(lora, specs, metadata)`.

  Raises:
    FileNotFoundError: no file at `path`.
    ValueError: the file is truncated, corrupt (a tensor or the header
      fails its digest, a spec holds a bad value) or of an unknown
      version, or its adapters differ from `expected` (missing or extra
      adapters, another rank or shape).
  """
  path = os.fspath(path)
  if os.path.isdir(path) and os.path.isfile(
      os.path.join(path, 'adapter_config.json')):
    raise _hf_peft_file(path)
  with open(path, 'rb') as f:
    data = f.read()
  meta = _read_metadata(path, data)
  specs = _parse_specs(path, meta)
  dtypes = _json_field(path, meta, 'dtypes', dict)
  digests = _json_field(path, meta, 'sha256', dict)
  user = _json_field(path, meta, 'user_metadata', dict)
  try:
    stored = dict(safetensors.deserialize(data))
  except Exception as e:  # The Rust error type is not a ValueError.
    raise _corrupt(path, f'safetensors could not read it ({e})') from e
  wanted = {n: s for s in specs for n in _tensor_names(s)}
  if set(stored) != set(wanted):
    raise _corrupt(path, f'tensors {sorted(set(stored) ^ set(wanted))!r} '
                   'are not both listed and stored')
  lora: dict[str, Any] = {}
  for name, info in stored.items():
    spec = wanted[name]
    per_layer = {'a': spec.a_shape, 'b': spec.b_shape,
                 'm': spec.magnitude_shape}[name.rsplit('/', 1)[1]]
    shape = (*spec.stack_shape, *per_layer)
    code = info['dtype']
    if (code not in _DTYPES or dtypes.get(name) != code
        or tuple(info['shape']) != tuple(shape)):
      raise _corrupt(path, f'{name!r} is {code} {info["shape"]} but its '
                     f'spec says {dtypes.get(name)} {list(shape)}')
    if hashlib.sha256(info['data']).hexdigest() != digests.get(name):
      raise _corrupt(path, f'the bytes of {name!r} fail their SHA-256 check')
    arr = np.frombuffer(info['data'], _DTYPES[code]).reshape(shape)
    _adapter_tree.adapter_node(lora, spec)[name.rsplit('/', 1)[1]] = (
        jnp.array(arr))
  if expected is not None:
    _compare_specs(path, specs,
                   _adapter_tree.check_specs(expected, 'load_adapters'))
  return LoadedAdapters(lora, specs, user)


def _compare_specs(path, got, expected) -> None:
  got_map = {s.key: s for s in got}
  exp_map = {s.key: s for s in expected}
  missing = sorted(set(exp_map) - set(got_map))
  extra = sorted(set(got_map) - set(exp_map))
  if missing or extra:
    raise ValueError(
        f'load_adapters: {path!r} does not hold the expected adapters: '
        f'missing {missing!r}, extra {extra!r}. Load the file saved for '
        'this model and surgery rules.'
    )
  for key, spec in exp_map.items():
    # Surgery records per-layer specs; the file also knows the stack.
    stored = got_map[key] if spec.stack_shape else got_map[key].unstacked()
    diff = stored.differences(spec)
    if 'use_dora' in diff:
      kinds = ['DoRA' if s.use_dora else 'LoRA' for s in (stored, spec)]
      raise ValueError(
          f'load_adapters: adapter {key!r} in {path!r} is {kinds[0]} '
          f'(use_dora={stored.use_dora}) but the model expects {kinds[1]} '
          f'(use_dora={spec.use_dora}). Adapt the model with '
          f'use_dora={stored.use_dora}, as when the file was saved.'
      )
    if diff:
      raise ValueError(
          f'load_adapters: adapter {key!r} in {path!r} differs from the '
          f'expected spec: {diff!r} (file, expected). Use the same rank, '
          'alpha and targets as when it was saved.'
      )


def check_adapters_match(lora: Any, params: Any, *,
                         check_dtypes: bool = True) -> None:
  """Checks loaded adapters against a model's current params.

  `params` are the adapted model's params (e.g. from `model.init` under
  surgery), whose adapter branches say which adapters the model expects.
  Passes when `lora` holds exactly those adapter arrays with equal shapes
  (and dtypes).

  Example:
    >>> import peft
    >>> params = {'d': {'kernel': jnp.ones((2, 2)),
    ...                 'lora': {'a': jnp.ones((2, 1)), 'b': jnp.ones((1, 2))}}}
    >>> check_adapters_match(peft.split_params(params).lora, params)

  Raises:
    ValueError: an adapter is missing or extra, or a shape or dtype differs.
  """
  def leaves(tree, what):
    _params.check_mapping(tree, what)
    out = {}
    for kp, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
      names = [str(getattr(k, 'key', k)) for k in kp]
      if any(_params.is_adapter_key(n) for n in names):
        out['/'.join(names)] = (tuple(np.shape(x)), jnp.result_type(x))
    return out

  got, want = leaves(lora, 'lora'), leaves(params, 'params')
  missing, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
  if missing or extra:
    raise ValueError(
        f'check_adapters_match: the loaded adapters miss {missing!r} and '
        f'have extra {extra!r} compared with the model. Apply the same '
        'surgery (targets, rank) that produced the file.'
    )
  for key, (shape, dtype) in want.items():
    if got[key][0] != shape or (check_dtypes and got[key][1] != dtype):
      raise ValueError(
          f'check_adapters_match: {key!r} is {got[key][1]} {got[key][0]} in '
          f'the loaded adapters but {dtype} {shape} in the model. Use the '
          'same rank and dtype, or cast (check_dtypes=False to skip dtypes).'
      )
