"""A real single-node Slurm cluster for the tests: install, configure, start, stop.

The fixture :func:`slurm_cluster` installs Debian's ``slurm-wlm`` and ``munge`` with apt-get when
``slurmctld`` is missing, writes a ``slurm.conf`` into a private temporary directory (one node with
this machine's CPUs and memory, partitions ``cpu`` and ``gpu``, free ports, its own munge socket so
nothing system-wide is touched), starts ``munged`` (as the munge user), ``slurmctld`` and
``slurmd``, waits for ``sinfo`` to report the node idle and points ``SLURM_CONF`` at the file for
the duration of the session. Afterwards it cancels what is left and stops the daemons by their pid
files. It skips, with the reason, only where apt-get is impossible (not root, no apt-get, or the
install fails).

Use it from a test module with ``from slurm_cluster import slurm_cluster_fixture  # noqa: F401``
(the fixture's name is ``slurm_cluster``).
"""

from __future__ import annotations

import getpass
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

PACKAGES = ("slurm-wlm", "munge")
START_TIMEOUT = 60.0
SBIN = ("/usr/sbin", "/sbin", "/usr/local/sbin")


@dataclass
class SlurmCluster:
    """Handles of a running test cluster: its directory, config file, node and partitions."""

    root: Path
    conf: Path
    node: str
    cpus: int
    memory_mb: int
    partitions: tuple[str, ...] = ("cpu", "gpu")
    pid_files: list[Path] = field(default_factory=list)

    def env(self) -> dict[str, str]:
        """The environment for Slurm client commands (``sbatch``, ``squeue`` ...)."""
        return {**os.environ, "SLURM_CONF": str(self.conf)}

    def run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        """Run a Slurm client command against this cluster and capture its output."""
        return subprocess.run(list(args), env=self.env(), capture_output=True, text=True,
                              check=check, timeout=60)

    def logs(self) -> str:
        """The tails of the daemon logs (for assertion messages)."""
        parts = []
        for name in ("slurmctld.log", "slurmd.log", "munged.log"):
            path = self.root / "log" / name
            if path.exists():
                parts.append(f"--- {name}\n" + "\n".join(path.read_text().splitlines()[-30:]))
        return "\n".join(parts)


def _binary(name: str) -> str | None:
    """A daemon's path: sbin directories are not always on a non-login PATH."""
    return shutil.which(name, path=os.pathsep.join([os.environ.get("PATH", ""), *SBIN]))


def _ensure_installed() -> None:
    """Install slurm-wlm and munge with apt-get, or skip the tests that need them."""
    if _binary("slurmctld") and _binary("munged"):
        return
    if os.geteuid() != 0:
        pytest.skip("Slurm is not installed and apt-get needs root (run as root or install "
                    "slurm-wlm munge yourself)")
    if not shutil.which("apt-get"):
        pytest.skip("Slurm is not installed and this system has no apt-get")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update", "-q"], ["apt-get", "install", "-y", "-q", *PACKAGES]):
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            last = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
            pytest.skip(f"cannot install {' '.join(PACKAGES)}: `{' '.join(cmd)}` failed: {last}")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _memory_mb() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            # Leave some head room: slurmd drains a node configured above its real memory.
            return int(int(line.split()[1]) / 1024 * 0.9)
    raise RuntimeError("no MemTotal in /proc/meminfo")


def write_config(root: Path, node: str, cpus: int, memory_mb: int) -> Path:
    """Write ``slurm.conf`` for one node and partitions ``cpu`` (default) and ``gpu``."""
    for sub in ("state", "spool", "log", "run"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    user = getpass.getuser()
    lines = [
        "ClusterName=gaptest",
        f"SlurmctldHost={node}(127.0.0.1)",
        f"SlurmctldPort={_free_port()}",
        f"SlurmdPort={_free_port()}",
        f"SlurmUser={user}",
        f"SlurmdUser={user}",
        "AuthType=auth/munge",
        "CredType=cred/munge",
        # cred_expire also delays a requeued job's restart (default 120 s): short for the tests.
        f"AuthInfo=socket={root / 'munge' / 'munge.socket'},cred_expire=5",
        f"StateSaveLocation={root / 'state'}",
        f"SlurmdSpoolDir={root / 'spool'}",
        f"SlurmctldPidFile={root / 'run' / 'slurmctld.pid'}",
        f"SlurmdPidFile={root / 'run' / 'slurmd.pid'}",
        f"SlurmctldLogFile={root / 'log' / 'slurmctld.log'}",
        f"SlurmdLogFile={root / 'log' / 'slurmd.log'}",
        # No cgroups in containers: track processes by parentage, do no task binding.
        "ProctrackType=proctrack/linuxproc",
        "TaskPlugin=task/none",
        "SelectType=select/cons_tres",
        "SelectTypeParameters=CR_Core_Memory",
        "SchedulerType=sched/builtin",
        "SchedulerParameters=sched_interval=1",
        "MpiDefault=none",
        "ReturnToService=2",
        "JobAcctGatherType=jobacct_gather/none",
        "AccountingStorageType=accounting_storage/none",
        "JobCompType=jobcomp/none",
        # Short waits keep the tests fast; finished jobs stay visible to squeue/scontrol a while.
        "KillWait=60",  # a loaded CI machine needs time to commit the current batch on SIGTERM
        "MinJobAge=600",
        "InactiveLimit=0",
        f"NodeName={node} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={memory_mb} State=UNKNOWN",
        f"PartitionName=cpu Nodes={node} Default=YES MaxTime=INFINITE State=UP",
        f"PartitionName=gpu Nodes={node} MaxTime=INFINITE State=UP",
    ]
    conf = root / "slurm.conf"
    conf.write_text("\n".join(lines) + "\n")
    return conf


def _start_munge(root: Path) -> Path:
    """Start a private munged (own key and socket) as the munge user; return its pid file."""
    mdir = root / "munge"
    mdir.mkdir(exist_ok=True)
    mdir.chmod(0o755)  # munged: every user must be able to reach the socket
    key = mdir / "munge.key"
    key.write_bytes(os.urandom(128))
    key.chmod(0o400)
    pid_file = mdir / "munged.pid"
    cmd = [_binary("munged") or "munged", f"--key-file={key}", f"--socket={mdir / 'munge.socket'}",
           f"--pid-file={pid_file}", f"--log-file={root / 'log' / 'munged.log'}",
           f"--seed-file={mdir / 'munged.seed'}"]
    if os.geteuid() == 0:
        # munged wants its files owned by the user it runs as; run it as munge, like the service.
        import pwd

        entry = pwd.getpwnam("munge")
        for path in (mdir, key):
            os.chown(path, entry.pw_uid, entry.pw_gid)
        os.chown(root / "log", 0, entry.pw_gid)
        (root / "log").chmod(0o775)
        cmd = [_binary("runuser") or "runuser", "-u", "munge", "--", *cmd]
    subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=30)
    return pid_file


def _wait_for(predicate, what: str, cluster: SlurmCluster, timeout: float = START_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.5)
    raise RuntimeError(f"local Slurm: {what} not reached after {timeout:.0f} s\n{cluster.logs()}")


def start_cluster(root: Path) -> SlurmCluster:
    """Configure and start munged, slurmctld and slurmd under ``root``; wait until idle."""
    node = socket.gethostname().split(".")[0]
    cluster = SlurmCluster(root=root, conf=Path(), node=node, cpus=os.cpu_count() or 1,
                           memory_mb=_memory_mb())
    cluster.conf = write_config(root, node, cluster.cpus, cluster.memory_mb)
    cluster.pid_files.append(_start_munge(root))
    env = cluster.env()
    subprocess.run([_binary("slurmctld") or "slurmctld", "-f", str(cluster.conf)], env=env, check=True,
                   timeout=30)
    cluster.pid_files.append(root / "run" / "slurmctld.pid")
    subprocess.run([_binary("slurmd") or "slurmd", "-f", str(cluster.conf), "-N", node], env=env, check=True,
                   timeout=30)
    cluster.pid_files.append(root / "run" / "slurmd.pid")

    def idle() -> bool:
        out = cluster.run("sinfo", "-h", "-N", "-o", "%t", check=False)
        return out.returncode == 0 and out.stdout.strip().startswith("idle")

    _wait_for(idle, "an idle node in sinfo", cluster)
    return cluster


def stop_cluster(cluster: SlurmCluster) -> None:
    """Cancel remaining jobs, then stop the daemons by their pid files (SIGTERM, then SIGKILL)."""
    cluster.run("scancel", "--full", "--user", getpass.getuser(), check=False)
    pids = []
    for pid_file in cluster.pid_files:
        try:
            pid = int(pid_file.read_text().split()[0])
            os.kill(pid, signal.SIGTERM)
            pids.append(pid)
        except (OSError, ValueError, IndexError):
            continue  # never started, or already gone
    deadline = time.monotonic() + 15
    while pids and time.monotonic() < deadline:
        pids = [pid for pid in pids if _alive(pid)]
        time.sleep(0.1)
    for pid in pids:
        os.kill(pid, signal.SIGKILL)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A daemon we started is our child only when it did not double-fork; reap it if it is.
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)
        return done == 0
    except ChildProcessError:
        return True


@pytest.fixture(scope="session", name="slurm_cluster")
def slurm_cluster_fixture() -> Iterator[SlurmCluster]:
    """A running single-node Slurm for the session; ``SLURM_CONF`` points at it meanwhile."""
    _ensure_installed()
    root = Path(tempfile.mkdtemp(prefix="gap-slurm-"))
    root.chmod(0o755)  # the munge user must reach its own subdirectory
    old = os.environ.get("SLURM_CONF")
    cluster = start_cluster(root)
    os.environ["SLURM_CONF"] = str(cluster.conf)
    try:
        yield cluster
    finally:
        stop_cluster(cluster)
        if old is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = old
        shutil.rmtree(root, ignore_errors=True)
