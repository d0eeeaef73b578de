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
ClusterName={cluster}
SlurmctldHost={ctld_host}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool-%n
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd-%n.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd-%n.log
SlurmctldPort={ctld_port}
SlurmdPort={d_port}
ReturnToService=2
JobRequeue=1
AuthInfo=cred_expire=10
SchedulerParameters=bf_interval=1,sched_interval=2
MinJobAge=600
KillWait=60
MpiDefault=none
{node_lines}
PartitionName=debug Nodes={names} Default=YES MaxTime=INFINITE State=UP
"""
# Test-cluster timing, not what a site would run: a requeued job waits cred_expire + 1 s before it may start again
# (Slurm's default credential lifetime, 120 s, made the requeue test wait 2 minutes), and the schedulers then
# look for it every 1-2 s instead of every 30 s (backfill) / 60 s (main loop). Step credentials are checked
# when a step launches, which takes well under a second here, so 10 s is ample.


def write_slurm_conf(root: Path, cluster: str, ctld_host: str, nodes: dict[str, str | None], d_port: int,
                     ctld_port: int) -> Path:
    """``root/slurm.conf`` for ``nodes`` ({name: address, or None for the name's own}), with the state, spool
    (one per node: ``%n``) and pid/log files under ``root``."""
    (root / "state").mkdir()
    for name in nodes:
        (root / f"spool-{name}").mkdir()
    node_lines = "\n".join(f"NodeName={name}" + (f" NodeAddr={address}" if address else "")
                           + f" CPUs={os.cpu_count()} State=UNKNOWN" for name, address in nodes.items())
    conf = root / "slurm.conf"
    conf.write_text(SLURM_CONF.format(cluster=cluster, ctld_host=ctld_host, root=root, ctld_port=ctld_port,
                                      d_port=d_port, node_lines=node_lines, names=",".join(nodes)))
    return conf


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
def slurm_cluster(tmp_path_factory, free_port):
    """Starts slurmctld + slurmd; yields the environment (SLURM_CONF) the CLI and sbatch need."""
    if not shutil.which("slurmctld"):
        pytest.fail("Slurm is not installed: run scripts/install-system-deps (as root) first")
    root = tmp_path_factory.mktemp("slurm")
    host = socket.gethostname()
    conf = write_slurm_conf(root, "tunerun-test", host, {host: None}, d_port=free_port(), ctld_port=free_port())
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
    for pid_file in (f"slurmd-{host}.pid", "slurmctld.pid"):
        try:
            os.kill(int((root / pid_file).read_text()), signal.SIGTERM)
        except (OSError, ValueError):
            pass
    if saved is None:
        os.environ.pop("SLURM_CONF", None)
    else:
        os.environ["SLURM_CONF"] = saved


def _sh(*args: str) -> None:
    result = subprocess.run(args, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(args)}: {result.stderr.strip()}")


class _TwoNodeNetwork:
    """A bridge in this namespace (the controller's address) and one network namespace per node, each joined to
    the bridge by a veth pair whose inner end is that node's eth0. Names and subnet carry this process id, so two
    test sessions on one machine do not collide."""

    def __init__(self, count: int = 2):
        tag = os.getpid() % 100000
        self.subnet = f"10.{200 + tag % 50}.{tag % 250}"
        self.bridge, self.bridge_ip = f"trbr{tag}", f"{self.subnet}.1"
        self.namespaces = [f"tunerun-node{i + 1}-{tag}" for i in range(count)]
        self.host_ends = [f"trv{i + 1}-{tag}" for i in range(count)]
        self.ips = [f"{self.subnet}.{11 + i}" for i in range(count)]
        # Where bridged traffic passes iptables (br_netfilter) and FORWARD drops it (hosts running Docker),
        # node-to-node traffic on this bridge needs its own ACCEPT rule; removed again in destroy().
        nf = Path("/proc/sys/net/bridge/bridge-nf-call-iptables")
        self.forward_rule = (["FORWARD", "-i", self.bridge, "-o", self.bridge, "-j", "ACCEPT"]
                             if shutil.which("iptables") and nf.exists() and nf.read_text().strip() == "1" else None)

    def create(self) -> None:
        _sh("ip", "link", "add", self.bridge, "type", "bridge")
        _sh("ip", "addr", "add", f"{self.bridge_ip}/24", "dev", self.bridge)
        _sh("ip", "link", "set", self.bridge, "up")
        for ns, host_end, ip in zip(self.namespaces, self.host_ends, self.ips):
            _sh("ip", "netns", "add", ns)
            _sh("ip", "link", "add", host_end, "type", "veth", "peer", "name", "eth0", "netns", ns)
            _sh("ip", "link", "set", host_end, "master", self.bridge)
            _sh("ip", "link", "set", host_end, "up")
            _sh("ip", "-n", ns, "addr", "add", f"{ip}/24", "dev", "eth0")
            _sh("ip", "-n", ns, "link", "set", "eth0", "up")
            _sh("ip", "-n", ns, "link", "set", "lo", "up")
        if self.forward_rule:
            _sh("iptables", "-I", *self.forward_rule)

    def pids(self, ns: str) -> list[int]:
        out = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True).stdout
        return [int(pid) for pid in out.split()]

    def destroy(self) -> None:
        """Ends what still runs inside the node namespaces (only what this fixture started lives there), then
        removes them and the bridge; the veth pairs go with their namespaces."""
        for sig in (signal.SIGTERM, signal.SIGKILL):
            alive = [pid for ns in self.namespaces for pid in self.pids(ns)]
            for pid in alive:
                try:
                    os.kill(pid, sig)
                except OSError:
                    pass
            deadline = time.monotonic() + 10
            while alive and time.monotonic() < deadline:
                alive = [pid for pid in alive if Path(f"/proc/{pid}").exists()]
                time.sleep(0.2)
        for ns in self.namespaces:
            subprocess.run(["ip", "netns", "delete", ns], capture_output=True)
        for host_end in self.host_ends:
            subprocess.run(["ip", "link", "delete", host_end], capture_output=True)
        subprocess.run(["ip", "link", "delete", self.bridge], capture_output=True)
        if self.forward_rule:
            subprocess.run(["iptables", "-D", *self.forward_rule], capture_output=True)


@pytest.fixture(scope="module")
def slurm_two_nodes(tmp_path_factory, free_port):
    """A 2-node Slurm partition on this machine: each `slurmd` runs in its own network, UTS and mount namespace
    (hostname nodeN, address on a bridge, its own /etc/hosts naming the nodes and the controller, as cluster DNS
    would), slurmctld in this namespace on the bridge address. The nodes share this machine's filesystem, as
    compute nodes share a cluster filesystem. Yields the environment for sbatch/squeue and the node addresses."""
    if os.geteuid() != 0 or not all(shutil.which(tool) for tool in ("ip", "nsenter", "unshare")):
        pytest.skip("network namespaces for a 2-node Slurm partition need root and ip, nsenter, unshare")
    if not shutil.which("slurmctld"):
        pytest.fail("Slurm is not installed: run scripts/install-system-deps (as root) first")
    root = tmp_path_factory.mktemp("slurm-nodes")
    net = _TwoNodeNetwork()
    names = [f"node{i + 1}" for i in range(len(net.ips))]
    host = socket.gethostname()
    conf = write_slurm_conf(root, "tunerun-nodes", f"{host}({net.bridge_ip})", dict(zip(names, net.ips)),
                            d_port=6818, ctld_port=free_port())
    hosts = root / "hosts"
    hosts.write_text("127.0.0.1 localhost\n" + f"{net.bridge_ip} {host}\n"
                     + "".join(f"{ip} {n}\n" for n, ip in zip(names, net.ips)))
    env = {**os.environ, "SLURM_CONF": str(conf)}
    daemons: list[subprocess.Popen] = []
    try:
        net.create()
        _ensure_munged()  # munge's socket is a file: every namespace here reaches the one munged
        subprocess.run(["slurmctld", "-f", str(conf)], check=True, env=env)
        for name, ns in zip(names, net.namespaces):
            inner = f"hostname {name} && mount --bind {hosts} /etc/hosts && exec slurmd -D -f {conf} -N {name}"
            daemons.append(subprocess.Popen(
                ["nsenter", f"--net=/var/run/netns/{ns}", "unshare", "--uts", "--mount", "sh", "-c", inner],
                stdout=(root / f"slurmd-{name}.out").open("w"), stderr=subprocess.STDOUT, env=env))
        deadline = time.monotonic() + 60
        while True:
            states = subprocess.run(["sinfo", "-h", "-N", "-o", "%t"], capture_output=True, text=True, env=env)
            if states.stdout.split() == ["idle"] * len(names):
                break
            if time.monotonic() > deadline:
                logs = [(root / f).read_text()[-1500:] for f in ("slurmctld.log", *(f"slurmd-{n}.out" for n in names))
                        if (root / f).exists()]
                raise RuntimeError(f"the nodes did not come up: {states.stdout!r}\n" + "\n".join(logs))
            time.sleep(0.5)
        yield {"env": env, "root": root, "nodes": dict(zip(names, net.ips))}
    finally:
        subprocess.run(["scancel", "--full", "--user=root"], capture_output=True, env=env)
        for daemon in daemons:
            daemon.terminate()
        try:
            os.kill(int((root / "slurmctld.pid").read_text()), signal.SIGTERM)
        except (OSError, ValueError):
            pass
        net.destroy()
        for daemon in daemons:
            try:
                daemon.wait(timeout=10)
            except subprocess.TimeoutExpired:
                daemon.kill()


@pytest.fixture(scope="session")
def ticket_task(tmp_path_factory, example_module) -> Path:
    """The ticket task of the learning tests (examples/make_support_data.py, 1,100 tickets, seed 1)."""
    return example_module("make_support_data").make_support_data(tmp_path_factory.mktemp("tickets") / "tickets.jsonl",
                                                                 n=1100, seed=1)


@pytest.fixture(scope="session")
def sharded_qlora(tmp_path_factory, tiny_model_dir, ticket_task, tunerun):
    """The ticket task as QLoRA + ZeRO-3, killed after its first checkpoint and resumed (learning_task.py): trained
    once for test_learning.py (does it learn as well as DDP QLoRA?) and test_qlora_zero3.py (resume, partitions,
    checkpoints, exports)."""
    from learning_task import train_sharded_killed_and_resumed

    run = train_sharded_killed_and_resumed(tmp_path_factory.mktemp("sharded-qlora"), tiny_model_dir, ticket_task,
                                           tunerun)
    yield run
    shutil.rmtree(run.env["RAY_TMPDIR"], ignore_errors=True)
