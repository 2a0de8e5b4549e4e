"""Throwaway network namespaces for the benchmarks, and the guarantee that they go away.

Every namespace is named ``tn-bench-<pid>-<role>``: the run's pid tells a stale namespace (its run
is gone) from one another run is using. ``Sandbox`` remembers what it created (namespaces, pinned
mount namespaces, processes) and removes exactly that, also on an exception, Ctrl-C or SIGTERM.
Nothing is ever added to the root namespace's addresses or routes.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

PREFIX = "tn-bench-"
RUN_ROOT = Path("/run")


class SandboxError(RuntimeError):
    pass


def sh(
    argv: Sequence[str], *, check: bool = True, input: str | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        list(argv), input=input, capture_output=True, text=True, timeout=timeout, check=False
    )
    if check and proc.returncode != 0:
        raise SandboxError(
            f"{' '.join(argv)[:200]} failed ({proc.returncode}): {proc.stderr.strip()[:500]}"
        )
    return proc


def list_namespaces() -> list[str]:
    out = sh(["ip", "netns", "list"], check=False).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale() -> list[str]:
    """Remove ``tn-bench-<pid>-*`` namespaces (and their run dirs) whose run has died.

    Only names this module creates are touched, and only when their pid is gone."""
    removed = []
    for ns in list_namespaces():
        match = re.fullmatch(rf"{PREFIX}(\d+)-.+", ns)
        if not match or _pid_alive(int(match.group(1))):
            continue
        _kill_ns_pids(ns)
        sh(["ip", "netns", "del", ns], check=False)
        removed.append(ns)
    for run_dir in RUN_ROOT.glob(f"{PREFIX}*"):
        match = re.fullmatch(rf"{PREFIX}(\d+)", run_dir.name)
        if match and not _pid_alive(int(match.group(1))):
            _unmount_below(run_dir)
            sh(["rm", "-rf", str(run_dir)], check=False)
    return removed


def _kill_ns_pids(ns: str) -> None:
    out = sh(["ip", "netns", "pids", ns], check=False).stdout
    pids = {int(p) for p in out.split()} - {os.getpid()}
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + 2
        while pids and time.monotonic() < deadline:
            pids = {p for p in pids if Path(f"/proc/{p}").exists() and not _zombie(p)}
            time.sleep(0.05)
        if not pids:
            return


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return True


def _unmount_below(path: Path) -> None:
    mounts = sh(["findmnt", "-rn", "-o", "TARGET"], check=False).stdout.split()
    for target in sorted((m for m in mounts if m.startswith(str(path))), reverse=True):
        sh(["umount", "-l", target], check=False)


class _Interrupted(BaseException):
    pass


class Sandbox:
    """``with Sandbox() as box:``; ``box.netns("gw")`` creates ``tn-bench-<pid>-gw``."""

    def __init__(self) -> None:
        self.pid = os.getpid()
        self.run_dir = RUN_ROOT / f"{PREFIX}{self.pid}"
        self.namespaces: list[str] = []
        self.mount_pins: dict[str, Path] = {}
        self.procs: list[subprocess.Popen] = []
        self._saved_handlers: dict[int, object] = {}
        self._mnt_ready = False

    # -- lifecycle ------------------------------------------------------------------------------
    def __enter__(self) -> Sandbox:
        for sig in (signal.SIGTERM, signal.SIGHUP):
            self._saved_handlers[sig] = signal.signal(sig, self._on_signal)
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _on_signal(self, signum: int, _frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    def close(self) -> None:
        # Ignore further Ctrl-C while removing: a half-done cleanup is the one thing to avoid.
        previous_int = signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            for proc in reversed(self.procs):
                if proc.poll() is None:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(proc.pid, signal.SIGTERM)
            for proc in reversed(self.procs):
                try:
                    proc.wait(timeout=3)
                except subprocess.TimeoutExpired:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
            self.procs.clear()
            for ns in reversed(self.namespaces):
                _kill_ns_pids(ns)
            if self.run_dir.exists():
                _unmount_below(self.run_dir)
            for ns in reversed(self.namespaces):
                sh(["ip", "netns", "del", ns], check=False)
            left = [ns for ns in self.namespaces if ns in list_namespaces()]
            self.namespaces = left
            sh(["rm", "-rf", str(self.run_dir)], check=False)
            if left:
                raise SandboxError(f"could not remove namespaces: {', '.join(left)}")
        finally:
            signal.signal(signal.SIGINT, previous_int)
            for sig, handler in self._saved_handlers.items():
                signal.signal(sig, handler)  # type: ignore[arg-type]
            self._saved_handlers.clear()

    # -- namespaces -----------------------------------------------------------------------------
    def name(self, role: str) -> str:
        return f"{PREFIX}{self.pid}-{role}"

    def netns(self, role: str) -> str:
        ns = self.name(role)
        sh(["ip", "netns", "add", ns])
        self.namespaces.append(ns)
        sh(["ip", "-n", ns, "link", "set", "lo", "up"])
        self.sysctl(ns, "net.ipv6.conf.all.disable_ipv6", "1")
        return ns

    def sysctl(self, ns: str, key: str, value: str) -> None:
        sh(["ip", "netns", "exec", ns, "sysctl", "-qw", f"{key}={value}"])

    def veth(self, ns_a: str, if_a: str, ns_b: str, if_b: str) -> None:
        sh(["ip", "-n", ns_a, "link", "add", if_a, "type", "veth", "peer", "name", if_b,
            "netns", ns_b])  # fmt: skip
        sh(["ip", "-n", ns_a, "link", "set", if_a, "up"])
        sh(["ip", "-n", ns_b, "link", "set", if_b, "up"])

    def ip_batch(self, ns: str, commands: Sequence[str]) -> None:
        sh(["ip", "-n", ns, "-b", "-"], input="\n".join(commands) + "\n")

    def exec_argv(self, ns: str, argv: Sequence[str]) -> list[str]:
        """``argv`` inside ``ns`` (and inside its private-/etc mount namespace, if it has one)."""
        pin = self.mount_pins.get(ns)
        if pin is None:
            return ["ip", "netns", "exec", ns, *argv]
        return ["nsenter", f"--net=/run/netns/{ns}", f"--mount={pin}", "--", *argv]

    def run(
        self, ns: str, argv: Sequence[str], *, check: bool = True, input: str | None = None,
        timeout: float = 600, env: dict | None = None,
    ) -> subprocess.CompletedProcess[str]:  # fmt: skip
        proc = subprocess.run(
            self.exec_argv(ns, argv), input=input, capture_output=True, text=True,
            timeout=timeout, check=False, env=env,
        )  # fmt: skip
        if check and proc.returncode != 0:
            gone = "" if ns in list_namespaces() else (
                " — the namespace is gone: something else removed it (the lab's cleanup() "
                "removes every tn-* namespace, tn-bench-* included)"
            )  # fmt: skip
            raise SandboxError(
                f"in {ns}: {' '.join(argv)[:200]} failed ({proc.returncode}){gone}: "
                f"{proc.stderr.strip()[-800:]}"
            )
        return proc

    def spawn(self, ns: str, argv: Sequence[str], *, env: dict | None = None,
              log: Path | None = None) -> subprocess.Popen:  # fmt: skip
        out = open(log, "ab") if log else subprocess.DEVNULL  # noqa: SIM115
        try:
            proc = subprocess.Popen(
                self.exec_argv(ns, argv), stdin=subprocess.DEVNULL, stdout=out,
                stderr=subprocess.STDOUT, env=env, start_new_session=True,
            )  # fmt: skip
        finally:
            if log:
                out.close()  # type: ignore[union-attr]
        self.procs.append(proc)
        return proc

    def private_etc(self, ns: str) -> Path:
        """Give ``ns`` a pinned mount namespace whose /etc is an overlay of the host's and whose
        /run/lock is private, so programs that write there (the gateway program writes
        /etc/tunnelnat) never touch the host. The same technique as the lab's machines."""
        root = self.run_dir / "machines" / ns
        for sub in ("etc", "work", "lock"):
            (root / sub).mkdir(parents=True, exist_ok=True)
        mnt = self.run_dir / "mnt"
        if not self._mnt_ready:
            mnt.mkdir(parents=True, exist_ok=True)
            # A mount namespace can only be pinned below a private mount.
            sh(["mount", "--bind", str(mnt), str(mnt)])
            sh(["mount", "--make-private", str(mnt)])
            self._mnt_ready = True
        pin = mnt / ns
        pin.touch()
        setup = (
            "set -e; umount -l /sys && mount -t sysfs tn-bench-sys /sys; "
            "mount -t overlay tn-bench-etc "
            f"-o lowerdir=/etc,upperdir={root}/etc,workdir={root}/work /etc; "
            "if [ -d /run/systemd ]; then mount -t tmpfs tn-bench-nosd /run/systemd; fi; "
            f"if [ -d /run/lock ]; then mount --bind {root}/lock /run/lock; fi"
        )
        sh(["unshare", f"--mount={pin}", "--propagation", "slave", "nsenter",
            f"--net=/run/netns/{ns}", "bash", "-c", setup])  # fmt: skip
        self.mount_pins[ns] = pin
        return pin
