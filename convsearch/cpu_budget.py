"""The CPU a process may really use: the smaller of its cgroup's CPU quota and its affinity mask.

`os.cpu_count()` is the host's core count. In a container with a CPU limit (a Kubernetes pod
limited to 2 CPUs on a 64-core node) or a process pinned with `taskset`, thread pools sized from
it oversubscribe: spinning OpenMP threads and CFS throttling then turn every forward pass into
seconds of latency. The budget is what those pools are sized from instead.

The quota is read from the cgroup hierarchy the process is in (/proc/self/cgroup): `cpu.max`
(cgroup v2: `QUOTA PERIOD`, or `max PERIOD` for none) or `cpu.cfs_quota_us` /
`cpu.cfs_period_us` (v1: a quota of -1 for none), at the process's own cgroup and each of its
ancestors, the smallest one found counting (a limit on a parent binds its children). A cgroup
path that is not there under the mount (a container that mounts its own cgroup as the root) is
skipped, so the walk still reaches the mount's root. The budget is the quota rounded down,
never more than the CPUs in the affinity mask, and at least 1.
"""

import dataclasses
import math
import os
import pathlib
from collections.abc import Iterator

CGROUP_ROOT = pathlib.Path("/sys/fs/cgroup")
PROC_SELF_CGROUP = pathlib.Path("/proc/self/cgroup")
# Where cgroup v1 mounts the cpu controller: alone, or joined with cpuacct.
_V1_CPU_DIRS = ("cpu", "cpu,cpuacct", "cpuacct,cpu")


@dataclasses.dataclass(frozen=True)
class CpuBudget:
    """Whole CPUs the process may use (`cpus`, at least 1), and what they were worked out from:
    the CPUs of the affinity mask, and the cgroup quota in CPUs (None: no quota)."""

    cpus: int
    affinity: int
    quota: float | None

    def describe(self) -> str:
        """E.g. `2 (affinity 64 CPUs, cgroup quota 2.5 CPUs)`."""
        quota = "no cgroup quota" if self.quota is None else f"cgroup quota {self.quota:g} CPUs"
        return f"{self.cpus} (affinity {self.affinity} CPUs, {quota})"


def _read(path: pathlib.Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def _v2_quota(directory: pathlib.Path) -> float | None:
    """CPUs allowed by `cpu.max` in `directory`; None when unlimited or unreadable."""
    text = _read(directory / "cpu.max")
    if not text:
        return None
    fields = text.split()
    if fields[0] == "max" or len(fields) != 2:
        return None
    try:
        quota, period = int(fields[0]), int(fields[1])
    except ValueError:
        return None
    return quota / period if quota > 0 and period > 0 else None


def _v1_quota(directory: pathlib.Path) -> float | None:
    """CPUs allowed by `cpu.cfs_quota_us` / `cpu.cfs_period_us` in `directory`; None when the
    quota is -1 (unlimited) or unreadable."""
    quota, period = _read(directory / "cpu.cfs_quota_us"), _read(directory / "cpu.cfs_period_us")
    try:
        quota_us, period_us = int(quota or "-1"), int(period or "0")
    except ValueError:
        return None
    return quota_us / period_us if quota_us > 0 and period_us > 0 else None


def _ancestry(mount: pathlib.Path, cgroup_path: str) -> Iterator[pathlib.Path]:
    """The directories of `cgroup_path` under `mount`, from the cgroup itself up to the mount."""
    parts = [part for part in cgroup_path.split("/") if part and part != ".."]
    for end in range(len(parts), -1, -1):
        directory = mount.joinpath(*parts[:end])
        if directory.is_dir():
            yield directory


def cgroup_quota(cgroup_root: pathlib.Path, proc_self_cgroup: str) -> float | None:
    """The smallest CPU quota, in CPUs, on the cgroup described by `proc_self_cgroup` (the text of
    /proc/self/cgroup) and its ancestors under `cgroup_root` (v2 and v1 alike); None for none."""
    quotas = []
    for line in proc_self_cgroup.splitlines():
        hierarchy, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if not hierarchy:
            continue
        if hierarchy == "0" and controllers == "":
            # cgroup v2: the unified hierarchy, mounted at the root (or at unified/ in hybrid mode)
            for mount in (cgroup_root, cgroup_root / "unified"):
                quotas += [q for d in _ancestry(mount, path) if (q := _v2_quota(d)) is not None]
        elif "cpu" in controllers.split(","):
            for name in _V1_CPU_DIRS:
                quotas += [q for d in _ancestry(cgroup_root / name, path) if (q := _v1_quota(d)) is not None]
    return min(quotas, default=None)


def budget_from(affinity: int, quota: float | None) -> CpuBudget:
    """The budget of a process that may run on `affinity` CPUs under a cgroup quota of `quota`
    CPUs (None: no quota): the smaller, rounded down, at least 1."""
    affinity = max(1, affinity)
    cpus = affinity if quota is None else min(affinity, math.floor(quota))
    return CpuBudget(cpus=max(1, cpus), affinity=affinity, quota=quota)


def cpu_budget(cgroup_root: pathlib.Path = CGROUP_ROOT, proc_self_cgroup: pathlib.Path = PROC_SELF_CGROUP,
               affinity: set[int] | None = None) -> CpuBudget:
    """This process's CPU budget (arguments for tests: another cgroup tree, another mask)."""
    if affinity is None:
        affinity = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set(range(os.cpu_count() or 1))
    return budget_from(len(affinity), cgroup_quota(cgroup_root, _read(proc_self_cgroup) or ""))
