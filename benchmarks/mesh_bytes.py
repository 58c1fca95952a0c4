"""How much of the frozen base one device holds under `finetune --mesh`.

Places the base (float, or quantized as `--quantize` does) with the CLI's
mesh rules (`peft._cli.mesh`, which places a quantized base through
`peft.quantized_shardings`), unrolled and stacked for `--scan-layers`,
and prints the bytes on device 0 against the whole base's. 1 / devices
is the bound; what stays whole (norm scales, axes the mesh does not
divide, NF4's block scales under FSDP, whose blocks run along `embed`)
keeps it above that.

  XLA_FLAGS=--xla_force_host_platform_device_count=8 \\
      python -m benchmarks.mesh_bytes [--quantize nf4] [--mesh fsdp=8] [--quick]

`--quick` uses the tiny model.
"""

from __future__ import annotations

import argparse
from typing import Any

import jax

from peft import models
from peft._cli import adapt
from peft._cli import base as base_lib
from peft._cli import mesh as mesh_lib
from peft._cli import parser as parser_lib


def device_share(tree: Any) -> tuple[int, int]:
  """Bytes of `tree` on the first device, and in all."""
  first = jax.devices()[0]
  held = sum(shard.data.nbytes for leaf in jax.tree.leaves(tree)
             for shard in leaf.addressable_shards if shard.device == first)
  whole = sum(leaf.nbytes for leaf in jax.tree.leaves(tree))
  return held, whole


def main(argv: list[str] | None = None) -> None:
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--quantize', choices=('int8', 'int4', 'nf4'))
  p.add_argument('--mesh', type=parser_lib.mesh_axes, default='fsdp=8')
  p.add_argument('--quick', action='store_true')
  args = p.parse_args(argv)
  base = base_lib.load_base(base_lib.TINY if args.quick else base_lib.SMOLLM2)
  # The base `finetune --quantize` trains over (only `quantize` matters).
  params = adapt.frozen_params(
      base, adapt.Settings(targets=(), rank=1, quantize=args.quantize))
  placement = mesh_lib.build(args.mesh, params, [], {})
  stacked = models.stack_layers(params, base.config)
  shown = ','.join(f'{k}={v}' for k, v in args.mesh)
  print(f'base {base.source}, {args.quantize or "float"}, --mesh {shown} '
        f'({jax.device_count()} devices)')
  for layout, tree, where in (
      ('unrolled', params, placement),
      ('stacked', stacked, placement.with_frozen(stacked))):
    held, whole = device_share(mesh_lib.put(tree, where.frozen))
    print(f'{layout:9} device 0 holds {held / 2**20:8.2f} of '
          f'{whole / 2**20:8.2f} MiB: {held / whole:.3f} '
          f'(1 / devices: {1 / jax.device_count():.3f})')


if __name__ == '__main__':
  main()
