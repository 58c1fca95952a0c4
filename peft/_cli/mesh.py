"""`finetune --mesh`: training on a device mesh, in one process or several.

`--mesh data=2,fsdp=4` lays all devices (of every process) out as a mesh
with those axes, whose sizes multiply to `jax.device_count()`:

* `data`: the batch rows are split over it; the params are whole on each.
* `fsdp`: the batch rows are split over it too, and every weight's `embed`
  axis (fully sharded data parallel: each device holds a slice of each
  weight).
* `model`: tensor parallel, over the `heads`, `kv_heads`, `mlp` and `vocab`
  axes.

The axis names of the base weights come from `models.partition_names`; an
adapter takes its kernel's, through the layer's delta equation, as the
linen wrapper does for boxed kernels (docs/sharding.md). A weight axis the
mesh axis does not divide stays whole.

Several processes (`--coordinator HOST:PORT --num-processes N
--process-id I`, the same command otherwise) join with
`jax.distributed.initialize`, with CPU collectives over gloo. Each reads
the data and draws the same stream of batch indices, but puts only the
rows of its own devices on them. Process 0 alone writes the outputs, from
arrays gathered from all processes; a process that stops answering ends the
others after `--heartbeat-timeout` seconds.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
import dataclasses
import math
from typing import Any

import jax
from jax.experimental import multihost_utils
from jax.sharding import AxisType
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec
import numpy as np

import peft
from peft import models
from peft._cli import base as base_lib
from peft._core import adapter_tree as _adapter_tree
from peft._core import dora as _dora
from peft._core import einsum as _einsum

CliError = base_lib.CliError

# The mesh axes a batch's rows are split over, in mesh order.
BATCH_AXES = ('data', 'fsdp')
# Logical weight axis -> the mesh axis that splits it.
RULES = {'embed': 'fsdp', 'heads': 'model', 'kv_heads': 'model',
         'mlp': 'model', 'vocab': 'model'}


def initialize(args: Any) -> None:
  """Joins the other processes (`--coordinator`), before any JAX work.

  Raises:
    CliError: a partial set of the three flags, or JAX already started.
  """
  given = {'--coordinator': args.coordinator,
           '--num-processes': args.num_processes,
           '--process-id': args.process_id}
  if all(v is None for v in given.values()):
    return
  missing = [flag for flag, v in given.items() if v is None]
  if missing:
    raise CliError(f'{", ".join(missing)} missing: a multi-process run needs '
                   '--coordinator, --num-processes and --process-id together.'
                   ' Pass all three, or none for one process.')
  if args.process_id >= args.num_processes:
    raise CliError(f'--process-id {args.process_id} is not below '
                   f'--num-processes {args.num_processes}. Number the '
                   'processes 0 to N-1.')
  if not args.mesh:
    raise CliError('a multi-process run needs --mesh (e.g. --mesh data=2,'
                   'fsdp=4) to lay out the devices of all processes.')
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  try:
    # The processes have JAX's default 5 minutes to join, whatever the
    # heartbeat: on a busy machine (or hosts that start apart) a short one
    # would fail a run that is only slow to start.
    jax.distributed.initialize(
        args.coordinator, args.num_processes, args.process_id,
        heartbeat_timeout_seconds=args.heartbeat_timeout)
  except RuntimeError as e:
    raise CliError(f'cannot join the processes at --coordinator '
                   f'{args.coordinator!r}: {e}') from None


def is_writer() -> bool:
  """Whether this process writes the outputs (process 0)."""
  return jax.process_index() == 0


@dataclasses.dataclass(frozen=True, kw_only=True, eq=False)
class Placement:
  """Where a run's arrays live on its mesh.

  Attributes:
    mesh: the device mesh.
    frozen: the frozen base's shardings (a tree like it).
    lora: the adapters' shardings.
  """

  mesh: Mesh
  frozen: Any
  lora: Any

  @property
  def batch_axes(self) -> tuple[str, ...]:
    """The mesh's axes that split the batch rows."""
    return tuple(a for a in BATCH_AXES if a in self.mesh.shape)

  @property
  def batch_ways(self) -> int:
    return math.prod(self.mesh.shape[a] for a in self.batch_axes)

  def batch_sharding(self) -> NamedSharding:
    """Of `(micro-batches, batch, length)` arrays: rows over the batch axes."""
    return NamedSharding(self.mesh,
                         PartitionSpec(None, self.batch_axes or None))

  def replicated(self) -> NamedSharding:
    return NamedSharding(self.mesh, PartitionSpec())

  def with_frozen(self, frozen: Any) -> Placement:
    """This placement for `frozen` in another layout of the same base
    (stacked for `--scan-layers`: each block's axes split as unrolled)."""
    return dataclasses.replace(
        self, frozen=_shardings(self.mesh, models.partition_names(frozen),
                                frozen))

  def put_batch(self, rows: Callable[[Any], np.ndarray],
                shape: Sequence[int]) -> jax.Array:
    """The global batch of `shape`, of which this process builds only its
    devices' parts: `rows(index)` returns `batch[index]`."""
    return jax.make_array_from_callback(tuple(shape), self.batch_sharding(),
                                        rows)


def build(axes: Sequence[tuple[str, int]], frozen: Any,
          specs: Sequence[peft.AdapterSpec], lora: Any) -> Placement:
  """The mesh `--mesh` asks for and the shardings of `frozen` (its blocks
  unrolled, as the adapters' paths name them) and `lora`.

  Raises:
    CliError: the axis sizes do not multiply to the device count.
  """
  sizes = dict(axes)
  count = jax.device_count()
  if math.prod(sizes.values()) != count:
    shown = ','.join(f'{k}={v}' for k, v in axes)
    raise CliError(
        f'--mesh {shown} has {math.prod(sizes.values())} devices but the run '
        f'has {count} ({jax.process_count()} process(es) of '
        f'{jax.local_device_count()}). Give axis sizes that multiply to '
        f'{count}.')
  # Auto axes: jit infers the program's shardings from its inputs' (JAX's
  # default, Explicit, types every intermediate's sharding instead).
  mesh = jax.make_mesh(tuple(sizes.values()), tuple(sizes),
                       axis_types=(AxisType.Auto,) * len(sizes))
  frozen_names = models.partition_names(frozen)
  return Placement(
      mesh=mesh, frozen=_shardings(mesh, frozen_names, frozen),
      lora=_shardings(mesh, adapter_names(specs, frozen_names), lora))


def _shardings(mesh: Mesh, names: Any, tree: Any) -> Any:
  def one(names, leaf):
    if not isinstance(leaf, peft.QuantizedArray):
      return sharding(mesh, names, leaf.shape)
    # A QLoRA kernel: its codes and scales placed as its float kernel is.
    stacked = leaf.values.shape[:len(names) - leaf.ndim]
    floats = sharding(mesh, names, (*stacked, *leaf.shape))
    return peft.quantized_shardings(floats, leaf)
  return _map_names(one, names, tree)


def sharding(mesh: Mesh, names: Sequence[str | None],
             shape: Sequence[int]) -> NamedSharding:
  """Each axis named by `RULES` goes over its mesh axis if that divides it.

  Example:
    >>> mesh = jax.make_mesh((2, 4), ('data', 'fsdp'),
    ...                      axis_types=(AxisType.Auto,) * 2)
    >>> sharding(mesh, ('vocab', 'embed'), (320, 64)).spec
    P(None, 'fsdp')
    >>> sharding(mesh, ('embed', None), (6, 4)).spec  # 6 % 4 != 0: whole.
    P(None, None)
  """
  spec = []
  for name, size in zip(names, shape):
    axis = RULES.get(name) if name else None
    ok = axis in mesh.shape and size % mesh.shape[axis] == 0
    spec.append(axis if ok else None)
  return NamedSharding(mesh, PartitionSpec(*spec))


def adapter_names(specs: Sequence[peft.AdapterSpec], frozen_names: Any
                  ) -> dict[str, Any]:
  """A tree like the adapters with the axis names of each A and B (and a
  DoRA magnitude: its kernel's names along `magnitude_axes`)."""
  out: dict[str, Any] = {}
  for spec in specs:
    names = _adapter_tree.module_at(frozen_names, spec, '--mesh')[
        spec.weight_name]
    node = _adapter_tree.adapter_node(out, spec)
    node['a'], node['b'] = _einsum.delta_partition_names(spec.delta_str,
                                                         names)
    if spec.use_dora:
      node[_dora.MAGNITUDE] = tuple(names[i] for i in spec.magnitude_axes)
  return out


def _is_names(x: Any) -> bool:
  return isinstance(x, tuple) and all(n is None or isinstance(n, str)
                                      for n in x)


def _map_names(fn: Callable[[Any, Any], Any], names: Any, tree: Any) -> Any:
  return jax.tree.map(fn, names, tree, is_leaf=_is_names)


def put(tree: Any, shardings: Any) -> Any:
  """Host arrays (the same on every process) as global arrays, each process
  putting only its devices' slices."""
  def one(leaf, where):
    host = np.asarray(leaf)
    return jax.make_array_from_callback(host.shape, where,
                                        lambda index: host[index])
  return jax.tree.map(one, tree, shardings)


def like_params(state: Any, params: Any, params_shardings: Any,
                default: NamedSharding) -> Any:
  """Shardings for an optimizer `state` (arrays or shapes): a leaf whose
  path ends with a param's path and has its shape (Adam's moments) takes
  that param's sharding, any other (step counts) `default`.

  `jit(tx.init)` cannot tell: its zeros depend on no input, so they come
  back on one device, and the first step would return them sharded, with
  a second compile.
  """
  by_path = {}
  for path, leaf in jax.tree_util.tree_leaves_with_path(params):
    by_path[tuple(map(str, path))] = leaf.shape
  shard_of = {tuple(map(str, path)): s for path, s in
              jax.tree_util.tree_leaves_with_path(params_shardings)}
  longest = max(map(len, by_path), default=0)

  def one(path, leaf):
    keys = tuple(map(str, path))
    for n in range(min(longest, len(keys)), 0, -1):
      if by_path.get(keys[-n:]) == leaf.shape:
        return shard_of[keys[-n:]]
    return default
  return jax.tree_util.tree_map_with_path(one, state)


def gather(tree: Any) -> Any:
  """Global arrays as whole host arrays, on every process (a collective:
  every process must call it)."""
  if jax.process_count() == 1:
    return jax.device_get(tree)
  return multihost_utils.process_allgather(tree, tiled=True)


def leave() -> None:
  """Leaves a multi-process run together with the others (a collective).

  Before a process ends without Python's shutdown (`os._exit`, as a
  stopped run does): every process waits here until all have written what
  they write, then leaves JAX's distributed runtime. Otherwise the first
  to exit looks dead to the rest, which then abort.
  """
  if jax.process_count() == 1:
    return
  multihost_utils.sync_global_devices('peft finetune: leaving')
  jax.distributed.shutdown()


def any_process(flag: bool) -> bool:
  """Whether `flag` is set on any process (a collective)."""
  if jax.process_count() == 1:
    return flag
  flags = multihost_utils.process_allgather(np.asarray([flag]), tiled=True)
  return bool(np.any(flags))
