"""A real Slurm cluster on this machine: munged, slurmctld and slurmd from Debian's slurm-wlm, started here.

`scripts/install-system-deps` installs the packages (CI runs as root on a bare machine). The daemons run as
root with proctrack/linuxproc and task/none, one node with this machine's CPUs, config in a temp folder.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

SLURM_CONF = """\
ClusterName=tunerun-test
SlurmctldHost={host}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd.log
SlurmctldPort={ctld_port}
SlurmdPort={d_port}
ReturnToService=2
JobRequeue=1
MinJobAge=600
KillWait=60
MpiDefault=none
NodeName={host} CPUs={cpus} State=UNKNOWN
PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP
"""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _ensure_munged() -> None:
    if subprocess.run(["munge", "-n"], capture_output=True).returncode == 0:
        return
    Path("/run/munge").mkdir(parents=True, exist_ok=True)
    shutil.chown("/run/munge", "munge", "munge")
    subprocess.run(["runuser", "-u", "munge", "--", "munged"], check=True)
    for _ in range(50):
        if subprocess.run(["munge", "-n"], capture_output=True).returncode == 0:
            return
        time.sleep(0.1)
    raise RuntimeError("munged did not start")


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    """Starts slurmctld + slurmd; yields the environment (SLURM_CONF) the CLI and sbatch need."""
    if not shutil.which("slurmctld"):
        pytest.fail("Slurm is not installed: run scripts/install-system-deps (as root) first")
    root = tmp_path_factory.mktemp("slurm")
    (root / "state").mkdir()
    (root / "spool").mkdir()
    conf = root / "slurm.conf"
    conf.write_text(SLURM_CONF.format(host=socket.gethostname(), root=root, cpus=os.cpu_count(),
                                      ctld_port=_free_port(), d_port=_free_port()))
    _ensure_munged()
    saved = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = str(conf)
    subprocess.run(["slurmctld", "-f", str(conf)], check=True)
    subprocess.run(["slurmd", "-f", str(conf)], check=True)
    deadline = time.monotonic() + 60
    while "idle" not in subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True).stdout:
        assert time.monotonic() < deadline, (root / "slurmctld.log").read_text()[-2000:]
        time.sleep(0.5)
    yield {"SLURM_CONF": str(conf), "root": root}
    subprocess.run(["scancel", "--full", "--user=root"], capture_output=True)
    for pid_file in ("slurmd.pid", "slurmctld.pid"):
        try:
            os.kill(int((root / pid_file).read_text()), signal.SIGTERM)
        except (OSError, ValueError):
            pass
    if saved is None:
        os.environ.pop("SLURM_CONF", None)
    else:
        os.environ["SLURM_CONF"] = saved
