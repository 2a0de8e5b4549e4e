"""The gateway's boot in the lab: the systemd units its user data writes, run in their order.

The lab has no systemd (documents see none, as in a container). ``GatewayBoot`` does what systemd
does with the same unit files (gateway/systemd/, installed into the gateway machine's
/etc/systemd/system as stacks/gateway.py's user data installs them, and read back from there):
it orders them by their ``Before=``/``After=`` together with systemd's own milestones and
strongswan.service, checks ``ConditionPathExists=`` on the machine, runs each ``ExecStart=`` in
turn there (the first failure fails the unit), and keeps charon down when a unit that
strongswan.service requires failed (``RequiredBy=``: fail closed).

What systemd and networkd do on AWS, the lab plays itself at the same points of the order:
- ``systemd-sysctl.service``: the ``net.`` settings of ConfigureGateway's sysctl.d file;
- ``network-online.target``: the primary links up with their default route (networkd's job);
- ``strongswan.service``: charon started as the lab starts it, then its ``ExecStartPost``
  (``swanctl --load-all``), as Debian's and Ubuntu's unit do.
"""

from __future__ import annotations

import shlex
import subprocess
import time
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from lab.ssm_runner import default_env

UNIT_DIR = "/etc/systemd/system"
STRONGSWAN = "strongswan.service"
# systemd's own order of the milestones our units refer to (systemd.special(7)).
MILESTONES = ("systemd-sysctl.service", "network-pre.target", "network-online.target", STRONGSWAN)
MILESTONE_ORDER = {
    "network-pre.target": {"systemd-sysctl.service"},
    "network-online.target": {"network-pre.target"},
}


@dataclass(frozen=True)
class Unit:
    name: str
    before: frozenset[str] = frozenset()
    after: frozenset[str] = frozenset()
    required_by: frozenset[str] = frozenset()
    conditions: tuple[str, ...] = ()  # ConditionPathExists=
    execs: tuple[tuple[str, ...], ...] = ()  # ExecStart=


def parse_unit(name: str, text: str) -> Unit:
    """The keys of a unit file that the boot order and the run need (all sections)."""
    values: dict[str, list[str]] = defaultdict(list)
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";", "[")):
            continue
        key, sep, value = line.partition("=")
        if sep:
            values[key.strip()].append(value.strip())

    def words(key: str) -> frozenset[str]:
        return frozenset(w for v in values[key] for w in v.split())

    return Unit(
        name=name,
        before=words("Before"),
        after=words("After"),
        required_by=words("RequiredBy"),
        conditions=tuple(values["ConditionPathExists"]),
        execs=tuple(tuple(shlex.split(v)) for v in values["ExecStart"]),
    )


def boot_order(units: Sequence[Unit], strongswan: Unit) -> list[str]:
    """A start order systemd could use: every Before/After respected; among units that could
    start together, milestones first, then the units in the order given."""
    nodes = [*MILESTONES, *(u.name for u in units)]
    preds: dict[str, set[str]] = {n: set(MILESTONE_ORDER.get(n, ())) for n in nodes}
    for unit in [*units, strongswan]:
        preds[unit.name] |= {a for a in unit.after if a in preds}
        for b in unit.before:
            if b in preds:
                preds[b].add(unit.name)
    order: list[str] = []
    while len(order) < len(nodes):
        ready = [n for n in nodes if n not in order and preds[n] <= set(order)]
        if not ready:
            raise ValueError(f"ordering cycle among {sorted(set(nodes) - set(order))}")
        order.append(ready[0])
    return order


@dataclass
class UnitRun:
    name: str
    state: str  # done, skipped (a condition), failed, not started (a required unit failed)
    started: float  # seconds after the boot started
    seconds: float
    output: str = ""


@dataclass
class GatewayBoot:
    """Run the gateway machine's boot units. ``run`` argv -> CompletedProcess on the machine;
    ``milestones`` name -> what the lab does there."""

    run_on_machine: Callable[[Sequence[str], Mapping[str, str]], subprocess.CompletedProcess]
    read_file: Callable[[str], str | None]
    milestones: Mapping[str, Callable[[], Any]]
    env: Mapping[str, str]
    unit_names: Sequence[str]
    # ConditionPathExists= on the machine (a condition may name a binary: the package).
    path_exists: Callable[[str], bool] | None = None
    runs: list[UnitRun] = field(default_factory=list)

    def units(self) -> list[Unit]:
        units = []
        for name in self.unit_names:
            text = self.read_file(f"{UNIT_DIR}/{name}")
            if text is None:
                raise FileNotFoundError(f"{UNIT_DIR}/{name} is not on the gateway")
            units.append(parse_unit(name, text))
        return units

    def strongswan_unit(self) -> Unit:
        # The distribution's unit (charon-systemd's), as the gateway would have it.
        for path in (f"/lib/systemd/system/{STRONGSWAN}", f"/usr/lib/systemd/system/{STRONGSWAN}"):
            text = self.read_file(path)
            if text is not None:
                return parse_unit(STRONGSWAN, text)
        return Unit(STRONGSWAN, after=frozenset({"network-online.target"}))

    def run(self) -> list[UnitRun]:
        units = {u.name: u for u in self.units()}
        order = boot_order(list(units.values()), self.strongswan_unit())
        env = {**default_env(), **self.env}
        started = time.monotonic()
        failed: set[str] = set()
        self.runs = []
        for name in order:
            at = time.monotonic() - started
            unit = units.get(name)
            if unit is None:  # a milestone
                required = {u.name for u in units.values() if name in u.required_by}
                if required & failed:
                    self.runs.append(
                        UnitRun(name, "not started", at, 0.0, "a required unit failed")
                    )
                    continue
                self.milestones[name]()
                self.runs.append(UnitRun(name, "done", at, time.monotonic() - started - at))
                continue
            exists = self.path_exists or (lambda path: self.read_file(path) is not None)
            missing = [p for p in unit.conditions if not exists(p)]
            if missing:
                self.runs.append(UnitRun(name, "skipped", at, 0.0, f"no {', '.join(missing)}"))
                continue
            state, output = "done", []
            for argv in unit.execs:
                proc = self.run_on_machine(argv, env)
                output.append((proc.stdout + proc.stderr).strip())
                if proc.returncode != 0:
                    state = "failed"
                    failed.add(name)
                    break
            seconds = time.monotonic() - started - at
            self.runs.append(UnitRun(name, state, at, seconds, "\n".join(output)))
        return self.runs

    def unit(self, name: str) -> UnitRun | None:
        return next((r for r in self.runs if r.name == name), None)


def net_sysctls(text: str) -> list[str]:
    """``key=value`` settings of a sysctl.d file that belong to a network namespace (``net.``):
    the only ones the lab may apply inside one (others are the host's)."""
    out = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        key, sep, value = line.partition("=")
        key, value = key.strip(), value.strip()
        if sep and key.startswith("net.") and key.replace(".", "").replace("_", "").isalnum():
            out.append(f"{key}={value}")
    return out


def read_machine_file(
    run: Callable[[Sequence[str]], subprocess.CompletedProcess], path: str
) -> str | None:
    proc = run(["cat", path])
    return proc.stdout if proc.returncode == 0 else None
