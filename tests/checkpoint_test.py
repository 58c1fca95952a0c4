"""Adapter-only safetensors checkpoints: round trips, validation, atomicity."""

import dataclasses
import json
import os
import pickle
import stat
import struct

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors

import peft
from peft._core import checkpoint as _checkpoint
from peft._core import file_modes as _file_modes
from peft._core import params as _params
from peft._core import spec as _spec
from tests import fixtures
from tests.helpers import assert_trees_close


def _spec_for(path, n_in, n_out, rank, *, weight_name='kernel',
              adapter_name='lora', alpha=None):
  return _spec.AdapterSpec(
      path=path, layer_type='Dense', weight_name=weight_name,
      adapter_name=adapter_name, weight_shape=(n_in, n_out),
      a_shape=(n_in, rank), b_shape=(rank, n_out), delta_str='ir,ro->io',
      einsum_str='...i,io->...o', rank=rank, alpha=alpha)


SPECS = (
    _spec_for(('enc', 'q'), 6, 4, 2, alpha=4.0),
    _spec_for(('mlp',), 4, 5, 3, weight_name='w1', adapter_name='lora_w1'),
    _spec_for(('mlp',), 5, 4, 1, weight_name='w2', adapter_name='lora_w2'),
)


def _params_for(specs=SPECS, dtype=jnp.float32, seed=0):
  rng = np.random.default_rng(seed)
  f = lambda s: jnp.asarray(rng.standard_normal(s, np.float32)).astype(dtype)
  params = {'enc': {'q': {}}, 'mlp': {}, 'norm': {'scale': f((4,))}}
  for spec in specs:
    node = params
    for key in spec.path:
      node = node.setdefault(key, {})
    node[spec.weight_name] = f(spec.weight_shape)
    node[spec.adapter_name] = {'a': f(spec.a_shape), 'b': f(spec.b_shape)}
  return params


@pytest.fixture
def path(tmp_path):
  return str(tmp_path / 'adapters.safetensors')


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
def test_round_trip_is_bit_exact(path, dtype):
  params = _params_for(dtype=dtype)
  meta = {'targets': ['enc/.*'], 'rank': 2, 'note': 'ünïcode'}
  _checkpoint.save_adapters(path, params, SPECS, metadata=meta)
  lora, specs, got_meta = _checkpoint.load_adapters(path, expected=SPECS)
  expected = _params.split_params(params).lora
  assert_trees_close(lora, expected)  # exact, dtypes included
  for got, want in zip(jax.tree.leaves(lora), jax.tree.leaves(expected)):
    assert np.asarray(got).tobytes() == np.asarray(want).tobytes()
  assert specs == SPECS and got_meta == meta
  assert_trees_close(_params.merge_params(
      _params.split_params(params).original, lora), params)


def test_saving_a_lora_tree_equals_saving_merged_params(tmp_path):
  params = _params_for()
  merged, split = str(tmp_path / 'm.st'), str(tmp_path / 's.st')
  _checkpoint.save_adapters(merged, params, SPECS)
  _checkpoint.save_adapters(split, _params.split_params(params).lora, SPECS)
  from_merged = _checkpoint.load_adapters(merged)
  from_split = _checkpoint.load_adapters(split)
  assert_trees_close(from_merged.lora, from_split.lora)
  assert from_merged.specs == from_split.specs == SPECS
  assert from_split.metadata == {}


def test_file_layout_is_plain_safetensors(path):
  params = _params_for(SPECS[:1])
  _checkpoint.save_adapters(path, params, SPECS[:1])
  with safetensors.safe_open(path, framework='np') as f:
    meta = f.metadata()
    assert sorted(f.keys()) == ['enc/q/lora/a', 'enc/q/lora/b']
    np.testing.assert_array_equal(f.get_tensor('enc/q/lora/a'),
                                  params['enc']['q']['lora']['a'])
  assert meta['format'] == 'peft.lora_adapters'
  assert meta['format_version'] == '2'
  assert json.loads(meta['adapters']) == [SPECS[0].to_json()]
  assert json.loads(meta['dtypes']) == {'enc/q/lora/a': 'F32',
                                        'enc/q/lora/b': 'F32'}
  assert meta['header_sha256'] == _checkpoint._header_digest(meta)


def _rewrite(path, edit_header, *, redigest=False):
  """Rewrites the JSON header of a saved file with `edit_header(header)`.

  With `redigest`, the header digest is recomputed afterwards, as a buggy
  or malicious writer would.
  """
  with open(path, 'rb') as f:
    data = f.read()
  (size,) = struct.unpack('<Q', data[:8])
  header = json.loads(data[8:8 + size])
  edit_header(header)
  if redigest:
    meta = header['__metadata__']
    meta['header_sha256'] = _checkpoint._header_digest(meta)
  raw = json.dumps(header).encode()
  raw += b' ' * (-len(raw) % 8)
  with open(path, 'wb') as f:
    f.write(struct.pack('<Q', len(raw)) + raw + data[8 + size:])


def _edit_meta(key, fn):
  def edit(header):
    meta = header['__metadata__']
    meta[key] = fn(meta[key])
  return edit


def _json_edit(fn):
  def edit(text):
    value = json.loads(text)
    fn(value)
    return json.dumps(value)
  return edit


def _set_item(key, value):
  def fn(d):
    d[key] = value
  return fn


def _spec_field(field, value):
  def fn(specs):
    specs[0][field] = value
  return fn


@pytest.mark.parametrize('edit, match', [
    (_edit_meta('format_version', lambda _: '99'),
     r"format version '99'; this peft reads versions 1, 2. Upgrade peft"),
    (_edit_meta('format', lambda _: 'other'),
     r"no 'peft.lora_adapters' metadata in the header"),
    (_edit_meta('dtypes', _json_edit(_set_item('enc/q/lora/a', 'F16'))),
     r"'enc/q/lora/a' is F32 \[6, 2\] but its spec says F16 \[6, 2\]"),
    (_edit_meta('adapters', _json_edit(_spec_field('a_shape', [6, 3]))),
     r"bad adapter specs .*A \(6, 3\) and B \(2, 4\) do not fit"),
    (_edit_meta('adapters', _json_edit(_spec_field('rank', 3))),
     r'bad adapter specs .*rank axes \[2\].*rank=3'),
    (_edit_meta('adapters', _json_edit(_spec_field('colour', 'red'))),
     r"unknown fields \['colour'\]"),
    (_edit_meta('adapters', lambda _: '{not json'),
     r"metadata field 'adapters' is missing or not JSON"),
    (_edit_meta('sha256', _json_edit(_set_item('enc/q/lora/b', '0' * 64))),
     r"bytes of 'enc/q/lora/b' fail their SHA-256 check"),
    (_edit_meta('dtypes', lambda _: '[1, 2]'),
     r"metadata field 'dtypes' is a list, not a dict"),
    (lambda h: h.pop('enc/q/lora/b'), r'is not a valid adapter file'),
])
def test_corrupt_metadata_raises(path, edit, match):
  """What a writer that recomputes the header digest gets refused for."""
  _checkpoint.save_adapters(path, _params_for(), SPECS)
  _rewrite(path, edit, redigest=True)
  with pytest.raises(ValueError, match=match):
    _checkpoint.load_adapters(path)


def test_truncated_files_raise(path):
  _checkpoint.save_adapters(path, _params_for(), SPECS)
  with open(path, 'rb') as f:
    data = f.read()
  for cut in (0, 5, 20, len(data) // 2, len(data) - 1):
    with open(path, 'wb') as f:
      f.write(data[:cut])
    with pytest.raises(ValueError, match=r'is not a valid adapter file: .*'
                       r'truncated or corrupt'):
      _checkpoint.load_adapters(path)


def test_flipped_data_byte_fails_the_digest(path):
  _checkpoint.save_adapters(path, _params_for(), SPECS)
  with open(path, 'r+b') as f:
    f.seek(-3, os.SEEK_END)
    byte = f.read(1)
    f.seek(-3, os.SEEK_END)
    f.write(bytes([byte[0] ^ 0x40]))
  with pytest.raises(ValueError, match=r'fail their SHA-256 check'):
    _checkpoint.load_adapters(path)


def test_header_garbage_raises(path):
  with open(path, 'wb') as f:
    f.write(struct.pack('<Q', 8) + b'{{{{{{{{')
  with pytest.raises(ValueError, match=r'header is not JSON'):
    _checkpoint.load_adapters(path)


def test_missing_file_raises(tmp_path):
  with pytest.raises(FileNotFoundError):
    _checkpoint.load_adapters(str(tmp_path / 'nope.safetensors'))


def test_expected_specs_are_enforced(path):
  _checkpoint.save_adapters(path, _params_for(), SPECS)
  other_rank = (_spec_for(('enc', 'q'), 6, 4, 3, alpha=4.0), *SPECS[1:])
  with pytest.raises(ValueError, match=r"adapter 'enc/q/lora' .* differs from "
                     r"the expected spec: .*'rank': \(2, 3\)"):
    _checkpoint.load_adapters(path, expected=other_rank)
  with pytest.raises(ValueError, match=r"missing \[\], extra "
                     r"\['mlp/lora_w2'\]"):
    _checkpoint.load_adapters(path, expected=SPECS[:2])
  extra = (*SPECS, _spec_for(('head',), 4, 2, 2))
  with pytest.raises(ValueError, match=r"missing \['head/lora'\], extra \[\]"):
    _checkpoint.load_adapters(path, expected=extra)


def test_failed_write_leaves_no_partial_file(path, monkeypatch):
  _checkpoint.save_adapters(path, _params_for(seed=0), SPECS)
  before = _checkpoint.load_adapters(path).lora

  def crash(f, data):
    f.write(data[:len(data) // 2])
    raise OSError('disk full')

  monkeypatch.setattr(_checkpoint, '_write', crash)
  with pytest.raises(OSError, match='disk full'):
    _checkpoint.save_adapters(path, _params_for(seed=1), SPECS)
  new_path = os.path.join(os.path.dirname(path), 'new.safetensors')
  with pytest.raises(OSError, match='disk full'):
    _checkpoint.save_adapters(new_path, _params_for(seed=1), SPECS)
  assert sorted(os.listdir(os.path.dirname(path))) == ['adapters.safetensors']
  assert_trees_close(_checkpoint.load_adapters(path).lora, before)


def test_save_errors(path):
  params = _params_for()
  with pytest.raises(ValueError, match=r'adapters is empty; there is nothing '
                     r'to save'):
    _checkpoint.save_adapters(path, params, [])
  with pytest.raises(TypeError, match=r'metadata must be JSON-serialisable'):
    _checkpoint.save_adapters(path, params, SPECS, metadata={'f': object()})
  with pytest.raises(ValueError, match=r"hold adapter 'mlp/lora_w2' but no "
                     r'AdapterSpec'):
    _checkpoint.save_adapters(path, params, SPECS[:2])
  with pytest.raises(ValueError, match=r"no adapter branch 'head/lora'"):
    _checkpoint.save_adapters(path, params, (*SPECS, _spec_for(('head',), 2,
                                                               2, 1)))
  ints = jax.tree.map(lambda x: x.astype(jnp.int32), params)
  with pytest.raises(ValueError, match=r"'enc/q/lora/a' has dtype int32; "
                     r'adapters must be float'):
    _checkpoint.save_adapters(path, ints, SPECS)
  with pytest.raises(TypeError, match=r'params_or_lora_tree must be a nested '
                     r'dict'):
    _checkpoint.save_adapters(path, [1], SPECS)
  assert not os.path.exists(path)


def test_check_adapters_match():
  params = _params_for()
  lora = _params.split_params(params).lora
  _checkpoint.check_adapters_match(lora, params)
  fewer = {'enc': lora['enc']}
  with pytest.raises(ValueError, match=r"miss \['mlp/lora_w1/a', "):
    _checkpoint.check_adapters_match(fewer, params)
  with pytest.raises(ValueError, match=r"have extra \['mlp/lora_w1/a', "):
    _checkpoint.check_adapters_match(lora, _params.merge_params(
        _params.split_params(params).original, fewer))
  bf16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), lora)
  with pytest.raises(ValueError, match=r"'enc/q/lora/a' is bfloat16 \(6, 2\) "
                     r'in the loaded adapters but float32 \(6, 2\)'):
    _checkpoint.check_adapters_match(bf16, params)
  _checkpoint.check_adapters_match(bf16, params, check_dtypes=False)
  wide = _params.merge_params(
      _params.split_params(params).original,
      {**lora, 'enc': {'q': {'lora': {'a': jnp.ones((6, 3)),
                                      'b': jnp.ones((3, 4))}}}})
  with pytest.raises(ValueError, match=r'float32 \(6, 2\) in the loaded '
                     r'adapters but float32 \(6, 3\) in the model'):
    _checkpoint.check_adapters_match(lora, wide)


def test_restore_into_a_surgery_adapted_model(path):
  """Save trained adapters; a fresh model run reproduces the outputs."""
  model, x = fixtures.Nested(), fixtures.features((3, fixtures.D))
  with peft.lora(rank=2, alpha=4.0) as report:
    trained = fixtures.random_params(model.init, jax.random.key(0), x, seed=1)
  _checkpoint.save_adapters(path, trained, report.specs,
                            metadata={'rank': 2})
  # A fresh session: same base weights, new (zero-B) adapters.
  fresh = jax.tree.map(jnp.zeros_like, trained)
  fresh = _params.merge_params(_params.split_params(trained).original,
                               _params.split_params(fresh).lora)
  lora, specs, meta = _checkpoint.load_adapters(path, expected=report.specs)
  _checkpoint.check_adapters_match(lora, fresh)
  restored = _params.merge_params(_params.split_params(fresh).original, lora)
  assert_trees_close(restored, trained)
  run = jax.jit(lambda p: model.apply({'params': p}, x))
  with peft.lora(rank=2, alpha=4.0):
    y, y_trained = run(restored), run(trained)
  np.testing.assert_array_equal(y, y_trained)
  assert meta == {'rank': 2} and specs == report.specs


# ------------------------------------------------- header integrity (v2)


def _adapter_edit(field, value):
  return _edit_meta('adapters', _json_edit(_spec_field(field, value)))


@pytest.mark.parametrize('edit', [
    _adapter_edit('alpha', 5.0),
    _adapter_edit('einsum_str', 'ab,bc->ac'),
    _adapter_edit('layer_type', 'Embed'),
    _adapter_edit('weight_name', 'bias'),
    _edit_meta('user_metadata', lambda _: json.dumps({'rank': 3})),
    _edit_meta('dtypes', _json_edit(_set_item('enc/q/lora/a', 'F16'))),
    _edit_meta('sha256', _json_edit(_set_item('enc/q/lora/b', '0' * 64))),
    _edit_meta('header_sha256', lambda d: d[::-1]),
    lambda h: h['__metadata__'].pop('header_sha256'),
    lambda h: h['__metadata__'].update(extra='field'),
], ids=['alpha', 'einsum_str', 'layer_type', 'weight_name', 'user_metadata',
        'dtypes', 'sha256', 'digest', 'no_digest', 'extra_field'])
def test_a_changed_header_fails_its_integrity_check(path, edit):
  _checkpoint.save_adapters(path, _params_for(), SPECS,
                            metadata={'rank': 2})
  _rewrite(path, edit)
  with pytest.raises(ValueError, match=r'is not a valid adapter file: the '
                     r"header fails its integrity check \(its 'header_sha256'"):
    _checkpoint.load_adapters(path)


def _as_version_1(header):
  """A version 1 file: the same header without the digest."""
  meta = header['__metadata__']
  del meta['header_sha256']
  meta['format_version'] = '1'


def test_version_1_files_load_with_a_warning(path):
  _checkpoint.save_adapters(path, _params_for(), SPECS, metadata={'r': 2})
  saved = _checkpoint.load_adapters(path)
  _rewrite(path, _as_version_1)
  with pytest.warns(UserWarning, match=r"is a version 1 adapter file, whose "
                    r'header .* has no integrity check.* Save it again'):
    loaded = _checkpoint.load_adapters(path)
  assert_trees_close(loaded.lora, saved.lora)
  assert loaded.specs == SPECS and loaded.metadata == {'r': 2}
  # v1 headers are not protected, but their spec values are validated.
  _rewrite(path, _adapter_edit('alpha', -4.0))
  with pytest.warns(UserWarning), pytest.raises(
      ValueError, match=r'LoRA alpha must be positive or None; got -4.0'):
    _checkpoint.load_adapters(path)


def test_version_1_with_a_header_digest_is_corrupt(path):
  _checkpoint.save_adapters(path, _params_for(), SPECS)
  _rewrite(path, _edit_meta('format_version', lambda _: '1'))
  with pytest.raises(ValueError, match=r"says format version 1, which has no "
                     r"'header_sha256', yet holds one"):
    _checkpoint.load_adapters(path)


# ------------------------------------------------------- spec validation


@pytest.mark.parametrize('field, value, match', [
    ('alpha', float('nan'), r'LoRA alpha must be positive or None; got nan'),
    ('alpha', -4.0, r'LoRA alpha must be positive or None; got -4.0'),
    ('alpha', float('inf'), r'LoRA alpha must be positive or None; got inf'),
    ('alpha', 0, r'LoRA alpha must be positive or None; got 0 at '
     r"'enc/q/lora'"),
    ('alpha', 'four', r"LoRA alpha must be positive or None; got 'four'"),
    ('rank', 0, r'LoRA rank must be a positive int; got 0'),
    ('rank', 2.0, r'LoRA rank must be a positive int; got 2.0'),
    ('rank', 3, r'rank axes \[2\], but the kernel is \(6, 4\) and rank=3'),
    ('use_rslora', 'yes', r"LoRA use_rslora must be a bool; got 'yes'"),
    ('path', ['enc', ''], r"path must be a tuple of non-empty str .*; got "
     r"\('enc', ''\)"),
    ('path', ['enc', 1], r'path must be a tuple of non-empty str'),
    ('path', ['a/b'], r"module path \('a/b',\) holds a \"/\""),
    ('layer_type', '', r"layer_type must be a non-empty str; got '' at "
     r"'enc/q/lora'. Pass e.g. layer_type='Dense'"),
    ('weight_name', 5, r'weight_name must be a non-empty str; got 5'),
    ('adapter_name', 'kernel', r"adapter_name must end in an adapter branch "
     r".*; got 'kernel' at 'enc/q/kernel'"),
    ('adapter_name', '/lora', r"adapter_name must end in an adapter branch"),
    ('weight_shape', [6, -4], r'weight_shape must be a tuple of positive '
     r"ints; got \(6, -4\) at 'enc/q/lora'"),
    ('a_shape', [6, 2.5], r'a_shape must be a tuple of positive ints'),
    ('b_shape', [], r'b_shape must be a tuple of positive ints; got \(\)'),
    ('stack_shape', [0], r'stack_shape must be a tuple of positive ints'),
    ('delta_str', 'ir,ro', r"delta_str must be an equation a,b->kernel; got "
     r"'ir,ro' at 'enc/q/lora' \(einsum_str must be"),
    ('delta_str', 'ir,ri->ii', r"delta_str must be an equation a,b->kernel"),
    ('delta_str', 'ir,ro->i', r"delta_str 'ir,ro->i' .* must name each "
     r'axis .* exactly one axis \(the rank\)'),
    ('delta_str', 'ir,ro->oi', r"A \(6, 2\) and B \(2, 4\) give a delta of "
     r'shape \(4, 6\) and rank axes \[2\], but the kernel is \(6, 4\)'),
    ('a_shape', [6, 2, 1], r"A \(6, 2, 1\) and B \(2, 4\) do not fit the "
     r"delta equation: 'ir' names 2 axes"),
    ('delta_str', 'ri,ro->io', r"axis 'r' is both 6 and 2"),
    ('einsum_str', 'nonsense', r"einsum_str must be None or the layer's "
     r"equation inputs,weights->outputs; got 'nonsense' at 'enc/q/lora' "
     r"\(einsum_str must be 'inputs,weights->outputs'"),
    ('einsum_str', 5, r"einsum_str must be None or the layer's equation .*; "
     r'got 5'),
    ('einsum_str', '...i,ioz->...oz', r'Weight shape \(6, 4\) has 2 axes but '
     r"the weights term 'ioz'"),
    ('einsum_str', '...o,io->...i', r"einsum_str '...o,io->...i' at "
     r"'enc/q/lora' splits the kernel as 'or,ri->io', but delta_str is "
     r"'ir,ro->io'"),
])
def test_bad_spec_values_are_refused_on_build_and_on_load(path, field, value,
                                                          match):
  with pytest.raises((TypeError, ValueError), match=match):
    _spec.AdapterSpec.from_json({**SPECS[0].to_json(), field: value})
  # A writer that recomputes the header digest gets no further.
  _checkpoint.save_adapters(path, _params_for(), SPECS)
  _rewrite(path, _adapter_edit(field, value), redigest=True)
  with pytest.raises(ValueError, match=r'bad adapter specs \(.*' + match):
    _checkpoint.load_adapters(path)


def test_specs_are_validated_when_built_or_replaced():
  with pytest.raises(ValueError, match=r'LoRA alpha must be positive or '
                     r"None; got nan at 'enc/q/lora'"):
    dataclasses.replace(SPECS[0], alpha=float('nan'))
  with pytest.raises(TypeError, match=r'path must be a tuple of non-empty '
                     r"str .*; got \['enc'\]"):
    dataclasses.replace(SPECS[0], path=['enc'])
  with pytest.raises(TypeError, match=r'Adapter metadata must be a dict of '
                     r'AdapterSpec fields; got \[1\]'):
    _spec.AdapterSpec.from_json([1])
  # Values are normalised: numpy ints, an int alpha.
  spec = dataclasses.replace(SPECS[0], rank=np.int64(2), alpha=4,
                             weight_shape=(np.int32(6), 4))
  assert spec == SPECS[0] and type(spec.rank) is int
  assert type(spec.alpha) is float and type(spec.weight_shape[0]) is int
  json.dumps(spec.to_json())


def test_a_non_dict_spec_in_a_file_is_refused(path):
  _checkpoint.save_adapters(path, _params_for(), SPECS)
  _rewrite(path, _edit_meta('adapters', lambda _: '[1]'), redigest=True)
  with pytest.raises(ValueError, match=r'bad adapter specs \(Adapter metadata'
                     r' must be a dict of AdapterSpec fields; got 1'):
    _checkpoint.load_adapters(path)


# ------------------------------------------------------------ file modes


def _mode(path):
  return stat.S_IMODE(os.stat(path).st_mode)


@pytest.mark.parametrize('mode', [0o600, 0o640, 0o664])
def test_resaving_keeps_the_file_mode(path, mode):
  _checkpoint.save_adapters(path, _params_for(), SPECS)
  os.chmod(path, mode)
  _checkpoint.save_adapters(path, _params_for(seed=1), SPECS)
  assert _mode(path) == mode


@pytest.fixture
def umask():
  """Sets the process umask for one test, then restores it."""
  old = os.umask(0o022)
  os.umask(old)
  yield os.umask
  os.umask(old)


@pytest.mark.parametrize('proc', [True, False], ids=['proc', 'os_umask'])
@pytest.mark.parametrize('mask', [0o077, 0o027, 0o002])
def test_a_new_file_follows_the_umask(path, umask, monkeypatch, mask, proc):
  if not proc:  # no /proc (macOS, a sandbox): read it with os.umask
    monkeypatch.setattr(_file_modes, '_PROC_STATUS', '/nonexistent/status')
  umask(mask)
  assert _file_modes.umask() == mask
  _checkpoint.save_adapters(path, _params_for(), SPECS)
  assert _mode(path) == 0o666 & ~mask
  assert os.umask(mask) == mask  # reading it left it unchanged


def test_the_directory_is_synced_after_the_rename(path, monkeypatch):
  synced = []
  fsync = os.fsync

  def record(fd):
    synced.append(stat.S_ISDIR(os.fstat(fd).st_mode))
    fsync(fd)

  monkeypatch.setattr(os, 'fsync', record)
  _checkpoint.save_adapters(path, _params_for(), SPECS)
  assert synced == [False, True]


_UNPICKLED = []


def _mark_unpickled():
  _UNPICKLED.append('ran')


class _Payload:
  def __reduce__(self):  # unpickling it calls _mark_unpickled
    return _mark_unpickled, ()


def test_a_renamed_pickle_is_refused_not_unpickled(path):
  with open(path, 'wb') as f:
    pickle.dump({'enc/q/lora/a': _Payload()}, f)
  with pytest.raises(ValueError, match=r'is not a valid adapter file: header '
                     r'of \d+ bytes but the file has \d+ more'):
    _checkpoint.load_adapters(path)
  assert not _UNPICKLED
