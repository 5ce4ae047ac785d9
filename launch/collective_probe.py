r"""How libtpu compiles one FSDP weight-gradient reduction for a TPU slice: reduce-scatter or not.

  python -m launch.collective_probe --topology=v5p-128
  python -m launch.collective_probe --topology=v5p-8 --how=psum_scatter

The gradient of a [4,096 x 12,288] bf16 kernel (an 8B decoder's MLP weight), contracted over a
batch sharded on every chip, is wanted sharded along its first axis, the FSDP layout:
  constraint    the einsum's output constrained to that sharding (what the train step's SPMD
                partitioning of a weight gradient amounts to)
  psum_scatter  an explicit `jax.lax.psum_scatter` under shard_map
Prints the collectives in the optimized program and its temporaries. launch/README.md ("Compile time
against MaxText") has what it showed: libtpu keeps a reduce-scatter only for groups of up to 4
chips and otherwise compiles an all-reduce of the whole gradient followed by a dynamic slice.
"""

from __future__ import annotations

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # never grab local accelerators: we compile only

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402
from jax.sharding import Mesh, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from launch import aot_compile  # noqa: E402
from launch import topology as topology_lib  # noqa: E402

HOW = ("constraint", "psum_scatter")


def define_flags() -> None:
  flags.DEFINE_string("topology", None, "TPU slice, e.g. v5p-128.")
  flags.DEFINE_enum("how", "constraint", HOW, "How the reduction is asked for.")
  flags.DEFINE_integer("embed", 4096, "Rows of the kernel (the sharded axis).")
  flags.DEFINE_integer("mlp", 12288, "Columns of the kernel.")
  flags.DEFINE_integer("positions", 512, "Positions per row (one row per chip).")


def weight_gradient(mesh: Mesh, how: str):
  """(x [B, T, E], dy [B, T, F]) -> dW [E, F] sharded along E over every device of `mesh`."""
  axis = mesh.axis_names[0]
  if how == "psum_scatter":
    def local(x, dy):
      return jax.lax.psum_scatter(jnp.einsum("bte,btf->ef", x, dy), axis, scatter_dimension=0, tiled=True)
    return jax.shard_map(local, mesh=mesh, in_specs=(P(axis), P(axis)), out_specs=P(axis, None))
  return lambda x, dy: jax.lax.with_sharding_constraint(jnp.einsum("bte,btf->ef", x, dy),
                                                        NamedSharding(mesh, P(axis, None)))


def probe(topology: str, how: str = "constraint", embed: int = 4096, mlp: int = 12288,
          positions: int = 512) -> dict:
  """{"collectives": {op: count}, "lines": [the collectives' HLO, shortened], "temp_bytes": int}."""
  topo = topology_lib.parse(topology)
  topology_lib.set_compile_only_env(topo)
  devices = topology_lib.devices(topo)
  mesh = Mesh(np.array(devices).reshape(-1), ("fsdp",))
  n = len(devices)
  if embed % n:
    raise ValueError(f"--embed={embed} is not a multiple of the {n} devices of {topology}")
  batch = NamedSharding(mesh, P("fsdp"))
  x = jax.ShapeDtypeStruct((n, positions, embed), jnp.bfloat16, sharding=batch)
  dy = jax.ShapeDtypeStruct((n, positions, mlp), jnp.bfloat16, sharding=batch)
  compiled = jax.jit(weight_gradient(mesh, how)).lower(x, dy).compile()
  text = compiled.as_text()
  counts = {kind: n for kind, n in aot_compile.collective_counts(text).items() if n}
  lines = [line.strip()[:160] for line in text.splitlines() if aot_compile.COLLECTIVE_OP.search(line)]
  return {"collectives": counts, "lines": lines, "temp_bytes": int(compiled.memory_analysis().temp_size_in_bytes)}


def main(argv):
  del argv
  f = flags.FLAGS
  if not f.topology:
    raise app.UsageError("--topology is required, e.g. --topology=v5p-128")
  r = probe(f.topology, f.how, f.embed, f.mlp, f.positions)
  print(f"{f.topology}, [{f.embed} x {f.mlp}] bf16 weight gradient, {f.how}: "
        + (", ".join(f"{v} {k}" for k, v in sorted(r["collectives"].items())) or "no collectives")
        + f"; temporaries {r['temp_bytes'] / 2**20:.1f} MiB")
  for line in r["lines"]:
    print("  " + line)


if __name__ == "__main__":
  define_flags()
  app.run(main)
