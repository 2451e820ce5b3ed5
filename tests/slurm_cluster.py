"""A private, real SLURM cluster (slurmctld + 2 slurmd + munged) on this one machine.

Used by tests/test_slurm.py; also runnable by hand::

    sudo .venv/bin/python tests/slurm_cluster.py        # start, print how to use it, Ctrl-C stops it

Everything lives in a fresh temp directory: slurm.conf, munge key and socket, state, spool,
pid and log files. Nothing under /etc is changed and no system service is started: the
daemons run in the foreground as children of this process (``munged -F``, ``slurmctld -D``,
``slurmd -D -N nX``), and clients find the cluster through ``SLURM_CONF`` (see ``env()``).
Two node names (n1, n2) share this host, each slurmd on its own port, NodeAddr 127.0.0.1.

``stop()`` cancels jobs, runs ``scontrol shutdown``, then ends every process the cluster
started, by pid: the daemons it spawned, plus any leftover process (slurmstepd, job steps)
whose environment carries this cluster's marker variable ``GD_SLURM_CLUSTER=<dir>`` (set on
the daemons and on every client call, so it reaches job processes too).

Needs root (the daemons run as root, SlurmUser=root) and the Debian packages slurmctld,
slurmd, slurm-client, munge; ``ensure_installed()`` runs .ci/install_slurm.sh when missing.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
INSTALL_SCRIPT = REPO / ".ci" / "install_slurm.sh"
MARKER = "GD_SLURM_CLUSTER"
SBIN_DIRS = ("/usr/sbin", "/sbin", "/usr/local/sbin")
NEEDED = ("slurmctld", "slurmd", "sbatch", "srun", "scontrol", "squeue", "scancel", "sinfo", "munged")
TERMINAL_STATES = {
    "COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
    "BOOT_FAIL", "DEADLINE", "PREEMPTED", "SPECIAL_EXIT",
}


class ClusterUnavailable(RuntimeError):
    """The cluster cannot be installed or started here (the message says why)."""


# ---------------------------------------------------------------- installation
def _path_with_sbin(path: str | None = None) -> str:
    parts = (path or os.environ.get("PATH", "")).split(os.pathsep)
    return os.pathsep.join(parts + [d for d in SBIN_DIRS if d not in parts])


def _which(name: str) -> str | None:
    return shutil.which(name, path=_path_with_sbin())


def missing_binaries() -> list[str]:
    return [b for b in NEEDED if _which(b) is None]


def ensure_installed(timeout: float = 600) -> None:
    """Install slurm + munge with .ci/install_slurm.sh when missing; ClusterUnavailable if impossible."""
    if not missing_binaries():
        return
    if os.geteuid() != 0:
        raise ClusterUnavailable("slurm/munge not installed and not running as root (cannot apt-get install)")
    if shutil.which("apt-get") is None:
        raise ClusterUnavailable("slurm/munge not installed and apt-get is not available")
    proc = subprocess.run(["bash", str(INSTALL_SCRIPT)], capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0 or missing_binaries():
        raise ClusterUnavailable(
            f"installing slurm/munge failed (rc={proc.returncode}); missing {missing_binaries()}:\n"
            f"{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}"
        )


def _die_with_parent() -> None:
    """In the child before exec: get SIGTERM when the process that started us dies (Linux), so
    that daemons do not outlive a test run that was killed before it could tear down."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM, 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _free_ports(n: int) -> list[int]:
    socks, ports = [], []
    try:
        while len(ports) < n:
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
            ports.append(s.getsockname()[1])
    finally:
        for s in socks:
            s.close()
    return ports


# ---------------------------------------------------------------- the cluster
class SlurmCluster:
    """A 2-node (by default) SLURM cluster in a temp dir. Use as a context manager or start()/stop()."""

    def __init__(self, nodes: int = 2, cpus_per_node: int = 1, real_memory_mb: int = 4000,
                 root: Path | None = None, kill_wait: int = 10, cred_expire: int = 10):
        self.nodes = [f"n{i + 1}" for i in range(nodes)]
        self.cpus_per_node = cpus_per_node
        self.real_memory_mb = real_memory_mb
        self.kill_wait = kill_wait
        self.cred_expire = cred_expire
        # Short path on purpose: the munge socket path must fit in sun_path (108 bytes).
        self.root = Path(root) if root else Path(tempfile.mkdtemp(prefix="gd-slurm-", dir="/tmp"))
        self.conf = self.root / "etc" / "slurm.conf"
        self.munge_socket = self.root / "munge" / "munge.sock"
        self.procs: dict[str, subprocess.Popen] = {}
        self.hostname = socket.gethostname()
        self.first_job_id = random.randint(1000, 60000)
        self.started = False

    # ------------------------------------------------------------ environment for clients
    def env(self, base: dict[str, str] | None = None) -> dict[str, str]:
        """Environment in which sbatch/squeue/scontrol talk to this cluster (and only to it)."""
        env = dict(os.environ if base is None else base)
        for key in list(env):
            # Do not leak an outer job's SLURM_* (e.g. when the tests run inside a SLURM job).
            if key.startswith(("SLURM_", "SBATCH_", "SRUN_", "SALLOC_")):
                del env[key]
        env["SLURM_CONF"] = str(self.conf)
        env["PATH"] = _path_with_sbin(env.get("PATH"))
        env[MARKER] = str(self.root)
        return env

    def cmd(self, *args: str, check: bool = True, timeout: float = 30, **kw) -> subprocess.CompletedProcess:
        """Run a slurm client command against this cluster."""
        env = kw.pop("env", None) or self.env()
        proc = subprocess.run(list(args), capture_output=True, text=True, timeout=timeout, env=env, **kw)
        if check and proc.returncode != 0:
            raise RuntimeError(f"{' '.join(args)} failed (rc={proc.returncode}): {proc.stderr.strip()}")
        return proc

    # ------------------------------------------------------------ configuration
    def _write_config(self) -> None:
        r = self.root
        for sub in ("etc", "munge", "state", "spool", "log", "run"):
            (r / sub).mkdir(parents=True, exist_ok=True)
        for name in self.nodes:
            (r / "spool" / name).mkdir(exist_ok=True)
        os.chmod(r / "munge", 0o755)
        ctld_port, *node_ports = _free_ports(1 + len(self.nodes))
        self.ctld_port, self.node_ports = ctld_port, node_ports
        (r / "etc" / "plugstack.conf").write_text("")
        lines = [
            "# generated by tests/slurm_cluster.py",
            "ClusterName=gdtest",
            f"SlurmctldHost={self.hostname}(127.0.0.1)",
            f"SlurmctldPort={ctld_port}",
            "SlurmUser=root",
            "SlurmdUser=root",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            # cred_expire also decides how long a requeued job waits before it may start again
            # (default 120 s); short here so the requeue test stays fast.
            f"AuthInfo=socket={self.munge_socket},cred_expire={self.cred_expire}",
            f"StateSaveLocation={r / 'state'}",
            f"SlurmdSpoolDir={r / 'spool' / '%n'}",
            f"SlurmctldPidFile={r / 'run' / 'slurmctld.pid'}",
            f"SlurmdPidFile={r / 'run' / 'slurmd-%n.pid'}",
            f"SlurmctldLogFile={r / 'log' / 'slurmctld.log'}",
            f"SlurmdLogFile={r / 'log' / 'slurmd-%n.log'}",
            f"PlugStackConfig={r / 'etc' / 'plugstack.conf'}",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core",
            "ReturnToService=2",
            "MpiDefault=none",
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
            "JobCompType=jobcomp/none",
            "JobRequeue=1",
            # Schedule every 2 s (defaults: 60 s main, 30 s backfill) so a requeued job restarts soon.
            "SchedulerParameters=sched_interval=2,bf_interval=2",
            "MailProg=/bin/true",
            f"KillWait={self.kill_wait}",
            "MinJobAge=600",
            "InactiveLimit=0",
            "SlurmctldDebug=info",
            "SlurmdDebug=info",
            f"FirstJobId={self.first_job_id}",
        ]
        for name, port in zip(self.nodes, node_ports):
            lines.append(
                f"NodeName={name} NodeHostname={self.hostname} NodeAddr=127.0.0.1 Port={port} "
                f"CPUs={self.cpus_per_node} RealMemory={self.real_memory_mb} State=UNKNOWN"
            )
        lines.append(f"PartitionName=debug Nodes={','.join(self.nodes)} Default=YES MaxTime=INFINITE State=UP")
        self.conf.write_text("\n".join(lines) + "\n")

    # ------------------------------------------------------------ start / stop
    def _spawn(self, key: str, argv: list[str]) -> None:
        log = open(self.root / "log" / f"{key}.stdout", "ab")
        env = self.env()
        self.procs[key] = subprocess.Popen(
            argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
            start_new_session=True, cwd=self.root, preexec_fn=_die_with_parent,
        )
        log.close()

    def _check_alive(self) -> None:
        for key, p in self.procs.items():
            if p.poll() is not None:
                raise ClusterUnavailable(f"{key} exited with {p.returncode} during start-up\n{self.logs_tail()}")

    def start(self, timeout: float = 60) -> "SlurmCluster":
        ensure_installed()
        if os.geteuid() != 0:
            raise ClusterUnavailable("starting slurmd/munged needs root")
        self._write_config()
        r = self.root
        key = r / "munge" / "munge.key"
        # A fresh key for this cluster only; munged insists on 0600 and a private directory.
        key.write_bytes(os.urandom(1024))
        os.chmod(key, 0o600)
        try:
            self._spawn("munged", [
                _which("munged"), "-F", "--force", f"--socket={self.munge_socket}", f"--key-file={key}",
                f"--pid-file={r / 'munge' / 'munged.pid'}", f"--log-file={r / 'log' / 'munged.log'}",
                f"--seed-file={r / 'munge' / 'munged.seed'}",
            ])
            self._wait(lambda: self.munge_socket.exists(), 15, "munged socket")
            self._spawn("slurmctld", [_which("slurmctld"), "-D", "-c", "-f", str(self.conf)])
            self._wait(lambda: self.cmd("scontrol", "ping", check=False, timeout=10).returncode == 0
                       and "UP" in self.cmd("scontrol", "ping", check=False, timeout=10).stdout, 30, "slurmctld ping")
            for name in self.nodes:
                self._spawn(f"slurmd-{name}", [_which("slurmd"), "-D", "-N", name, "-f", str(self.conf)])
            self._wait(self._all_idle, timeout, "nodes idle")
        except BaseException:
            self.stop()
            raise
        self.started = True
        return self

    def _all_idle(self) -> bool:
        out = self.cmd("sinfo", "-h", "-N", "-o", "%N %t", check=False, timeout=10).stdout.split("\n")
        states = dict(line.split() for line in out if line.strip())
        return all(states.get(n, "").rstrip("*") == "idle" for n in self.nodes)

    def _wait(self, pred, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._check_alive()
            try:
                if pred():
                    return
            except (subprocess.TimeoutExpired, OSError, RuntimeError):
                pass
            time.sleep(0.3)
        raise ClusterUnavailable(f"timed out after {timeout:.0f}s waiting for {what}\n{self.logs_tail()}")

    def logs_tail(self, n: int = 3000) -> str:
        parts = []
        # The *.stdout files repeat the daemons' logs; show them only for a daemon that died.
        dead = {k for k, p in self.procs.items() if p.poll() is not None}
        files = sorted((self.root / "log").glob("*.log"))
        files += [self.root / "log" / f"{k}.stdout" for k in sorted(dead)]
        for f in files:
            try:
                text = f.read_text(errors="replace")
            except OSError:
                continue
            if text.strip():
                parts.append(f"--- {f.name}\n{text[-n:]}")
        return "\n".join(parts)

    def marked_pids(self) -> list[int]:
        """Pids of live processes whose environment carries this cluster's marker."""
        want = f"{MARKER}={self.root}".encode()
        pids = []
        for d in Path("/proc").iterdir():
            if not d.name.isdigit() or int(d.name) == os.getpid():
                continue
            try:
                env = (d / "environ").read_bytes()
            except OSError:
                continue
            if want in env.split(b"\0"):
                pids.append(int(d.name))
        return pids

    def stop(self) -> None:
        """Cancel jobs, shut the daemons down, and kill (by pid) everything this cluster started."""
        ctld = self.procs.get("slurmctld")
        if ctld is not None and ctld.poll() is None:
            self.cmd("scancel", "--full", "--user", "root", check=False, timeout=15)
            deadline = time.monotonic() + self.kill_wait + 15
            while time.monotonic() < deadline:
                q = self.cmd("squeue", "-h", "-o", "%i", check=False, timeout=10)
                if q.returncode != 0 or not q.stdout.strip():
                    break
                time.sleep(0.5)
            self.cmd("scontrol", "shutdown", check=False, timeout=15)
        # munged last: slurmd/slurmctld need it to shut down cleanly.
        order = [k for k in self.procs if k != "munged"] + (["munged"] if "munged" in self.procs else [])
        for key in order:
            p = self.procs[key]
            if key == "munged" and p.poll() is None:
                p.send_signal(signal.SIGTERM)
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait(timeout=5)
        # Anything left that this cluster started (slurmstepd, job processes): by pid.
        for sig in (signal.SIGTERM, signal.SIGKILL):
            pids = self.marked_pids()
            if not pids:
                break
            for pid in pids:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline and self.marked_pids():
                time.sleep(0.2)
        self.started = False

    def __enter__(self) -> "SlurmCluster":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ------------------------------------------------------------ jobs
    def sbatch(self, *args: str, cwd: Path | str | None = None, env: dict[str, str] | None = None) -> int:
        """Submit a batch job; returns its id."""
        proc = self.cmd("sbatch", "--parsable", *args, cwd=cwd, env=self.env(env))
        return int(proc.stdout.strip().split(";")[0])

    def job(self, job_id: int | str) -> dict[str, str]:
        """`scontrol show job -o` as a dict ({} once the job is gone)."""
        proc = self.cmd("scontrol", "-o", "show", "job", str(job_id), check=False, timeout=15)
        if proc.returncode != 0:
            return {}
        line = proc.stdout.strip().split("\n")[0]
        # key=value pairs separated by spaces; values may contain spaces only in a few fields
        # (Command, WorkDir, ...), which are last-wins and good enough for our use.
        return dict(re.findall(r"(\S+?)=(\S*)", line))

    def wait_job(self, job_id: int | str, timeout: float, poll: float = 1.0,
                 until=None) -> dict[str, str]:
        """Wait until the job reaches a terminal state (or `until(info)` is true); returns its info."""
        deadline = time.monotonic() + timeout
        info: dict[str, str] = {}
        while time.monotonic() < deadline:
            info = self.job(job_id)
            state = info.get("JobState", "")
            if until is not None:
                if until(info):
                    return info
            elif state in TERMINAL_STATES:
                return info
            time.sleep(poll)
        raise TimeoutError(f"job {job_id} not done after {timeout:.0f}s; last info: {info}\n{self.logs_tail()}")


def main() -> int:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nodes", type=int, default=2)
    ap.add_argument("--cpus-per-node", type=int, default=1)
    args = ap.parse_args()
    cluster = SlurmCluster(nodes=args.nodes, cpus_per_node=args.cpus_per_node)
    try:
        cluster.start()
    except ClusterUnavailable as err:
        print(f"cannot start the cluster: {err}", file=sys.stderr)
        return 1
    try:
        print(f"cluster up in {cluster.root}; in another shell:\n"
              f"  export SLURM_CONF={cluster.conf} {MARKER}={cluster.root} PATH=$PATH:/usr/sbin\n"
              "  sinfo; sbatch -N 2 slurm/train.sbatch ...\nCtrl-C stops it.", flush=True)
        # (SIGINT is ignored in a background job of a non-interactive shell: handle both.)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.default_int_handler)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        cluster.stop()
        print("cluster stopped")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
