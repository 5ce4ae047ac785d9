"""Cloud TPU slice names -> what libtpu needs to describe them, and the per-chip facts we check against.

Why a table: a CPU host can compile for a pod only through `jax.experimental.topologies`, whose
`get_topology_desc` wants libtpu's own spelling of a slice ("v5:4x4x4", chip config "megacore",
4 chips per host), not the user-facing name ("v5p-128"). The user-facing names count TensorCores
for v4/v5p (2 per chip, fused as one "megacore" device) and chips for v5e/v6e, so v5p-128 is 64
chips = 64 JAX devices, while v5e-256 is 256 chips = 256 devices.

Accepted spellings:
  v5p-128, v6e-256, v5e-16, v4-32       user-facing names; power-of-two sizes, the grid derived the way
                                        Cloud TPU lays out its default slices (v5litepod-16 = v5e-16)
  v5p:4x4x12, v6e:8x16                  any explicit chip grid (non-default or non-power-of-two shapes)
  cpu                                   this host's CPU devices (tests: compile, save and load a step)
"""

from __future__ import annotations

import dataclasses
import math
import os
import re

import jax
from jax.experimental import topologies

GIB = 1024 ** 3
ALIASES = {"v5litepod": "v5e"}  # gcloud / xpk spell v5e slices v5litepod-N


@dataclasses.dataclass(frozen=True)
class Chip:
  name: str  # user-facing generation, e.g. "v5p"
  libtpu_name: str  # prefix libtpu wants in the topology name, e.g. "v5"
  device_kind: str  # what jax reports as Device.device_kind
  hbm_bytes: int  # HBM per chip (= per JAX device: megacore chips are one device)
  peak_bf16_flops: float  # dense bf16 FLOP/s per chip (vendor figure)
  cores_in_name: int  # how many units of the user-facing "-N" one chip is
  grid_dims: int  # 3-D torus (v4, v5p) or 2-D (v5e, v6e)
  chip_config: str  # "megacore" (two TensorCores as one device) or "default"


CHIPS = {
    "v4": Chip("v4", "v4", "TPU v4", 32 * GIB, 275e12, 2, 3, "megacore"),
    "v5p": Chip("v5p", "v5", "TPU v5", 95 * GIB, 459e12, 2, 3, "megacore"),
    "v5e": Chip("v5e", "v5e", "TPU v5 lite", 16 * GIB, 197e12, 1, 2, "default"),
    "v6e": Chip("v6e", "v6e", "TPU v6 lite", 32 * GIB, 918e12, 1, 2, "default"),
}
# This host's CPU devices (not a TPU: no libtpu); "HBM" is the host's memory, the peak a nominal 1 TFLOP/s.
CPU = Chip("cpu", "", "cpu", os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), 1e12, 1, 1, "")


@dataclasses.dataclass(frozen=True)
class Topology:
  name: str  # as given by the user
  chip: Chip
  grid: tuple[int, ...]  # chips along each torus axis
  num_slices: int = 1

  @property
  def chips_per_slice(self) -> int:
    return math.prod(self.grid)

  @property
  def num_chips(self) -> int:
    return self.chips_per_slice * self.num_slices

  @property
  def libtpu_topology(self) -> str:
    if self.chip is CPU:
      return f"cpu:{self.grid[0]}"
    return f"{self.chip.libtpu_name}:{'x'.join(map(str, self.grid))}"

  @property
  def chips_per_host_bounds(self) -> tuple[int, int, int]:
    """Chips one TPU VM host drives: 2x2 everywhere except the 8-chip single-host v5e/v6e VMs."""
    if self.chip.grid_dims == 2 and self.chips_per_slice == 8:
      return (2, 4, 1)
    if self.chips_per_slice < 4:
      return tuple(self.grid) + (1,) * (3 - len(self.grid))
    return (2, 2, 1)

  @property
  def wrap(self) -> tuple[bool, bool, bool]:
    """Which axes of the slice close into a ring (wraparound links), as libtpu wants them.

    3-D slices (v4, v5p) built of whole 4x4x4 cubes are tori on all three axes; smaller ones are
    open meshes. 2-D slices (v5e, v6e) wrap along a side of 16 chips, the full pod edge. Without
    this, libtpu compiles for an open mesh: on v5p-128 every FSDP all-gather then becomes an
    all-reduce of zero-padded buffers (2x the ICI bytes, and a fifth of the 8B step's backend
    compile work; launch/README.md, "Compile time against MaxText").
    """
    if self.chip.grid_dims == 3:
      return (all(g % 4 == 0 for g in self.grid),) * 3
    if self.chip.grid_dims == 2:
      return tuple(g == 16 for g in self.grid) + (False,)
    return (False, False, False)

  @property
  def accelerator_type(self) -> str:
    """The TPU_ACCELERATOR_TYPE string of one slice (e.g. v5p-128)."""
    return f"{self.chip.name}-{self.chips_per_slice * self.chip.cores_in_name}"

  def describe(self) -> str:
    s = f"{self.accelerator_type} ({self.libtpu_topology}, {self.chips_per_slice} chips"
    if self.num_slices > 1:
      s += f" x {self.num_slices} slices = {self.num_chips} chips"
    return s + ")"


def _default_grid(chips: int, dims: int) -> tuple[int, ...]:
  """Cloud TPU's default slice shape for a power-of-two chip count."""
  if dims == 2:
    a = 2 ** (int(math.log2(chips)) // 2)
    return (a, chips // a)
  if chips < 4:
    raise ValueError(f"3-D slices start at 4 chips (2x2x1), got {chips}")
  grid = [2, 2, 1]
  while math.prod(grid) < chips:
    # Double the last of the smallest axes: 2x2x1 -> 2x2x2 -> 2x2x4 -> 2x4x4 -> 4x4x4 -> 4x4x8 ...
    grid.sort()
    smallest = [i for i, g in enumerate(grid) if g == grid[0]]
    grid[smallest[-1]] *= 2
  return (2, 2, 1) if chips == 4 else tuple(sorted(grid))


def parse(name: str, num_slices: int = 1) -> Topology:
  """'v5p-128' or 'v5p:4x4x12' (+ number of slices) -> Topology. Raises ValueError naming the problem."""
  if num_slices < 1:
    raise ValueError(f"--num_slices must be >= 1, got {num_slices}")
  if name == "cpu":
    if num_slices != 1:
      raise ValueError("--topology=cpu has one slice")
    return Topology(name, CPU, (len(jax.devices("cpu")),))
  known = ", ".join(sorted(CHIPS))
  m = re.fullmatch(r"(v\d+[a-z]*)-(\d+)", name)
  if m:
    gen, n = ALIASES.get(m.group(1), m.group(1)), int(m.group(2))
    if gen not in CHIPS:
      raise ValueError(f"--topology={name}: unknown TPU generation {gen!r}; known: {known}")
    chip = CHIPS[gen]
    if n % chip.cores_in_name:
      raise ValueError(f"--topology={name}: {gen} sizes count TensorCores ({chip.cores_in_name} per chip); "
                       f"{n} is not a multiple of {chip.cores_in_name}")
    chips = n // chip.cores_in_name
    if chips & (chips - 1):
      raise ValueError(f"--topology={name}: {chips} chips is not a power of two; give the grid explicitly, "
                       f"e.g. --topology={gen}:4x4x12")
    return Topology(name, chip, _default_grid(chips, chip.grid_dims), num_slices)
  m = re.fullmatch(r"(v\d+[a-z]*):(\d+(?:x\d+)+)", name)
  if m:
    gen = m.group(1)
    if gen not in CHIPS:
      raise ValueError(f"--topology={name}: unknown TPU generation {gen!r}; known: {known}")
    chip = CHIPS[gen]
    grid = tuple(int(x) for x in m.group(2).split("x"))
    if len(grid) != chip.grid_dims:
      raise ValueError(f"--topology={name}: {gen} slices are {chip.grid_dims}-D grids, got {len(grid)}-D")
    return Topology(name, chip, grid, num_slices)
  raise ValueError(f"--topology={name!r}: expected e.g. v5p-128, v6e-256, v5e-16, v4-32 or v5p:4x4x12")


def set_compile_only_env(topo: Topology) -> None:
  """Environment for libtpu on a host without TPUs: no metadata-server queries, one fake worker.

  Must run before the first `get_topology_desc` call (libtpu reads these when it loads). Without
  them libtpu probes the GCE metadata server and warns that it cannot find the accelerator type.
  """
  os.environ["TPU_SKIP_MDS_QUERY"] = "1"
  # libtpu takes /tmp/libtpu_lockfile so that two processes never drive one TPU; compile-only use
  # drives none, and any JAX process on this host that probed the TPU plugin would otherwise block us.
  os.environ["ALLOW_MULTIPLE_LIBTPU_LOAD"] = "1"
  os.environ["TPU_ACCELERATOR_TYPE"] = topo.accelerator_type
  os.environ["TPU_WORKER_ID"] = "0"
  os.environ["TPU_WORKER_HOSTNAMES"] = "localhost"


def devices(topo: Topology):
  """Compile-only TPU devices of the whole topology (all slices); needs the `libtpu` package.
  For `cpu`: this host's CPU devices (real ones: what is compiled for them can also run)."""
  if topo.chip is CPU:
    return jax.devices("cpu")
  set_compile_only_env(topo)
  try:
    desc = topologies.get_topology_desc(
        topology_name=topo.libtpu_topology, platform="tpu", chip_config_name=topo.chip.chip_config,
        chips_per_host_bounds=topo.chips_per_host_bounds, num_slices=topo.num_slices, wrap=topo.wrap)
  except Exception as e:  # pylint: disable=broad-except
    hint = ""
    try:  # only to name the cause; importing libtpu early would load it before the env above is set
      import libtpu  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
    except ImportError:
      hint = " (the `libtpu` package is not installed: pip install libtpu, or `pip install -e .[tpu_aot]`)"
    raise RuntimeError(f"libtpu could not describe topology {topo.describe()}{hint}: "
                       f"{type(e).__name__}: {e}") from e
  devs = list(desc.devices)
  if len(devs) != topo.num_chips:
    raise RuntimeError(f"libtpu returned {len(devs)} devices for {topo.describe()}, expected {topo.num_chips}")
  return devs
