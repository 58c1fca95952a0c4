"""`peft.models._gguf_file.read_gguf` against the `gguf` package's reader.

The file is made with `gguf.GGUFWriter` and holds every metadata value type
and plain, half, bfloat16 and block-quantized (Q8_0, Q4_1, Q4_K)
tensors; both readers must
see the same values and bytes.
"""

import gguf
import numpy as np
import pytest

from peft.models import _gguf_file

T = gguf.GGUFValueType
Q = gguf.GGMLQuantizationType


def _write(path, *, extra=()):
  writer = gguf.GGUFWriter(str(path), 'llama')
  scalars = {T.UINT8: 200, T.INT8: -100, T.UINT16: 60000, T.INT16: -30000,
             T.UINT32: 4_000_000_000, T.INT32: -2_000_000_000,
             T.FLOAT32: 0.25, T.BOOL: True, T.UINT64: 2**60,
             T.INT64: -2**60, T.FLOAT64: 1e-300, T.STRING: 'héllo'}
  for vtype, value in scalars.items():
    writer.add_key_value(f'test.{vtype.name.lower()}', value, vtype)
  writer.add_array('test.ints', [1, -2, 3])
  writer.add_array('test.floats', [0.5, -1.5])
  writer.add_array('test.strings', ['a', '', 'ünï'])
  writer.add_array('test.bools', [True, False])
  writer.add_key_value('test.nested', [[1, 2], [3]], T.ARRAY)
  rng = np.random.default_rng(0)
  w = rng.standard_normal((4, 256)).astype(np.float32)
  writer.add_tensor('plain', w)
  writer.add_tensor('half', w.astype(np.float16))
  writer.add_tensor('ints', np.arange(12, dtype=np.int32).reshape(3, 4))
  for kind in (Q.BF16, Q.Q8_0, Q.Q4_1, *extra):
    writer.add_tensor(kind.name.lower(), gguf.quants.quantize(w, kind),
                      raw_dtype=kind)
  # gguf cannot quantize to Q4_K (Gemma 3's type), so its 144-byte blocks
  # are random, with small finite scales (the first two float16s).
  blocks = rng.integers(0, 256, (4, 144), dtype=np.uint8)
  blocks[:, :4] = np.full((4, 2), 0.01, np.float16).view(np.uint8)
  writer.add_tensor('q4_k', blocks, raw_dtype=Q.Q4_K)
  for write in (writer.write_header_to_file, writer.write_kv_data_to_file,
                writer.write_tensors_to_file, writer.close):
    write()
  return path


@pytest.fixture(scope='module')
def path(tmp_path_factory):
  return _write(tmp_path_factory.mktemp('gguf') / 'all.gguf')


def test_fields_and_tensors_equal_the_gguf_packages_reader(path):
  ours = _gguf_file.read_gguf(path)
  theirs = gguf.GGUFReader(str(path))
  assert ours.version == 3
  # GGUFReader adds the header's counts as 'GGUF.*' fields.
  header = {k for k in theirs.fields if k.startswith('GGUF.')}
  assert list(ours.fields) == [k for k in theirs.fields if k not in header]
  for key, field in theirs.fields.items():
    if key in header or key == 'test.nested':  # contents() can't read it.
      continue
    assert ours.fields[key] == field.contents(), key
  assert ours.fields['test.nested'] == [[1, 2], [3]]
  assert ours.fields['test.float64'] == 1e-300
  assert ours.fields['test.string'] == 'héllo'
  assert [t.name for t in ours.tensors] == [t.name for t in theirs.tensors]
  for mine, ref in zip(ours.tensors, theirs.tensors):
    assert mine.tensor_type == ref.tensor_type, mine.name
    assert mine.shape == tuple(ref.shape.tolist()), mine.name
    assert mine.data.dtype == ref.data.dtype, mine.name
    np.testing.assert_array_equal(mine.data, ref.data, err_msg=mine.name)
    if mine.name == 'ints':  # gguf dequantizes floats only.
      continue
    np.testing.assert_array_equal(
        gguf.quants.dequantize(mine.data, mine.tensor_type),
        gguf.quants.dequantize(ref.data, ref.tensor_type), err_msg=mine.name)


def test_tensor_views_are_read_only(path):
  data = _gguf_file.read_gguf(path).tensors[0].data
  with pytest.raises(ValueError, match='read-only'):
    data[0, 0] = 1.0


def _patched(path, tmp_path, edit):
  out = tmp_path / 'patched.gguf'
  out.write_bytes(edit(bytearray(path.read_bytes())))
  return out


def _set_u32(at, value):
  def edit(data):
    data[at:at + 4] = value.to_bytes(4, 'little')
    return bytes(data)
  return edit


def _first_value_type_offset(data):
  n = int.from_bytes(data[24:32], 'little')  # The first key's length.
  return 32 + n


@pytest.mark.parametrize('edit, match', [
    (lambda d: b'GGUX' + bytes(d[4:]), r"it starts with b'GGUX', not b'GGUF'"),
    (_set_u32(4, 7), r'GGUF version 7 is not one of \(2, 3\)'),
    (lambda d: _set_u32(_first_value_type_offset(d), 99)(d),
     'unknown metadata value type 99'),
    (lambda d: bytes(d[:28]), 'the file ends inside its metadata'),
    (lambda d: bytes(d[:40]), 'a 20-byte string runs past the end'),
    (lambda d: bytes(d[:-16]), "tensor 'q4_k' runs past the end of the file"),
])
def test_broken_files_say_what_is_wrong(path, tmp_path, edit, match):
  with pytest.raises(_gguf_file.GGUFFormatError, match=match):
    _gguf_file.read_gguf(_patched(path, tmp_path, edit))


def test_unknown_tensor_type_and_repeated_names_are_refused(path, tmp_path):
  data = path.read_bytes()
  # A tensor info: name length (u64), name, n_dims (u32), dims, type (u32).
  at = data.index(b'plain') + len('plain')
  n_dims = int.from_bytes(data[at:at + 4], 'little')
  type_at = at + 4 + 8 * n_dims
  bad = _patched(path, tmp_path, _set_u32(type_at, 250))
  with pytest.raises(_gguf_file.GGUFFormatError,
                     match="tensor 'plain' has unknown ggml type 250"):
    _gguf_file.read_gguf(bad)
  twice = _patched(path, tmp_path, lambda d: bytes(d).replace(
      b'\x04\x00\x00\x00\x00\x00\x00\x00half', b'\x04\x00\x00\x00\x00\x00'
      b'\x00\x00ints', 1))
  with pytest.raises(_gguf_file.GGUFFormatError, match='names a tensor twice'):
    _gguf_file.read_gguf(twice)


def test_empty_file_is_refused(tmp_path):
  empty = tmp_path / 'empty.gguf'
  empty.write_bytes(b'')
  with pytest.raises(_gguf_file.GGUFFormatError, match='it is empty'):
    _gguf_file.read_gguf(empty)
