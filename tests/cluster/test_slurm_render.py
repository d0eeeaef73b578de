"""The sbatch script: rendered from slurm/train.sbatch.j2, compared with reviewed expected files, inert for
hostile spec values.

Regenerate the expected files after a deliberate template change with:
    TUNERUN_REGENERATE=1 python -m pytest tests/cluster/test_slurm_render.py
"""
from __future__ import annotations

import json
import os
import shlex
import subprocess
from pathlib import Path

import pytest

from tunerun.cluster.slurm import pending_reason, render_sbatch
from tunerun.cluster.targets import job_model
from tunerun.jobs.errors import SpecError
from tunerun.jobs.loader import load_job, load_job_text
from tunerun.jobs.plan import resolve

REPO = Path(__file__).resolve().parents[2]
EXPECTED = Path(__file__).resolve().parent / "expected" / "slurm"
EXAMPLES = sorted((REPO / "jobs" / "examples").glob("*.yaml"))
FIXED = ["storage.uri=s3://training/runs", "storage.endpoint_url=https://minio.internal:9000",
         "targets.slurm.log_dir=/shared/slurm-logs", "targets.slurm.python=/shared/venv/bin/python"]


@pytest.fixture
def user_project(tmp_path, monkeypatch):
    """A working directory holding what the example specs point at (model folders, data files)."""
    monkeypatch.chdir(tmp_path)
    for example in EXAMPLES:
        spec = load_job(example, model=job_model())
        model = tmp_path / spec.model.path
        model.mkdir(parents=True, exist_ok=True)
        (model / "config.json").write_text("{}")
        train = tmp_path / spec.data.train.replace("*", "part-0")
        train.parent.mkdir(parents=True, exist_ok=True)
        train.write_text(json.dumps({"text": "x"}) + "\n")
    return tmp_path


def rendered(example: Path, *overrides: str) -> str:
    job = resolve(load_job(example, [*FIXED, *overrides], model=job_model()), run_id=f"{example.stem}-20261123-101500")
    return render_sbatch(job)


@pytest.mark.parametrize("example", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_shipped_examples_render_to_their_reviewed_scripts(user_project, example):
    script = rendered(example)
    expected = EXPECTED / f"{example.stem}.sbatch"
    if os.environ.get("TUNERUN_REGENERATE"):
        expected.write_text(script)
    assert script == expected.read_text(), "template output changed; see the module docstring to regenerate"


def test_script_carries_resources_signals_and_credentials_by_name_only(user_project, monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "this-must-not-appear-anywhere")
    script = rendered(EXAMPLES[[p.stem for p in EXAMPLES].index("zero3-70b")])
    assert "#SBATCH --nodes=4" in script and "#SBATCH --gpus-per-node=8" in script
    assert "#SBATCH --requeue" in script and "#SBATCH --signal=B:USR1@120" in script
    assert "AWS_SECRET_ACCESS_KEY" in script and "this-must-not-appear-anywhere" not in script
    assert subprocess.run(["bash", "-n"], input=script, text=True).returncode == 0


@pytest.mark.parametrize("key,value", [
    ("targets.slurm.partition", 'x"; rm -rf ~; echo "'),
    ("targets.slurm.account", "$(whoami)"),
    ("targets.slurm.time", "04:00:00 --wrap=id"),
    ("targets.slurm.export", "[AWS_KEY=secret]"),
    ("targets.slurm.python", "python3; id"),
])
def test_hostile_values_for_sbatch_lines_are_refused(user_project, key, value):
    with pytest.raises(SpecError) as error:
        load_job(EXAMPLES[0], [*FIXED, f"{key}={value}"], model=job_model())
    assert key in str(error.value)


def test_account_qos_and_partition_are_one_sbatch_line_each(user_project):
    """What `tunerun serve` sets per project (projects.<name>.slurm) reaches sbatch as these lines."""
    script = rendered(EXAMPLES[0], "targets.slurm.account=acme", "targets.slurm.qos=normal",
                      "targets.slurm.partition=gpu-a100")
    lines = [line for line in script.splitlines() if line.startswith("#SBATCH")]
    assert {"#SBATCH --account=acme", "#SBATCH --qos=normal", "#SBATCH --partition=gpu-a100"} <= set(lines)
    with pytest.raises(SpecError, match="cannot stand on an #SBATCH line"):
        rendered(EXAMPLES[0], "targets.slurm.account=acme --qos=high")


@pytest.mark.parametrize("reason, says", [
    ("Priority", "waiting behind higher-priority jobs in the partition (Slurm: Priority)"),
    ("Resources", "waiting for free nodes, CPUs or GPUs in the partition (Slurm: Resources)"),
    ("QOSMaxJobsPerUserLimit", "waiting for the QOS's limit on running jobs per user (Slurm: QOSMaxJobsPerUserLimit)"),
    ("AssocGrpGRES", "waiting for the account's GPU limit (Slurm: AssocGrpGRES)"),
    ("AssocGrpMemLimit", "waiting for the account's limit (Slurm: AssocGrpMemLimit)"),  # by its prefix
    ("QOSGrpNodeLimit", "waiting for the QOS's limit (Slurm: QOSGrpNodeLimit)"),
    ("Reservation", "pending in Slurm: Reservation"),
    ("None", None), (None, None),
])
def test_squeue_pending_reasons_read_as_words_a_team_can_act_on(reason, says):
    assert pending_reason(reason) == says


def test_a_newline_cannot_start_a_new_directive_or_command(user_project):
    with pytest.raises(SpecError, match="control characters"):
        load_job_text('name: x\nmodel: {path: m}\ndata: {train: d}\ntargets: {slurm: {qos: "a\\n#SBATCH --uid=0"}}',
                      model=job_model())


def test_shell_values_are_quoted_and_never_evaluated(user_project, tmp_path):
    """The storage URI reaches the shell in the trainer command: run that line with the interpreter swapped for
    printf, which shows the words bash passed, and compare the run URI with the literal."""
    canary = tmp_path / "canary"
    hostile = f"/tmp/runs $(touch {canary}) `touch {canary}` ; touch {canary}"
    script = rendered(EXAMPLES[0], f"storage.uri={hostile}", "storage.endpoint_url=null")
    [driver] = [line for line in script.splitlines() if " -m tunerun.trainer " in line]
    python, arguments = driver.removesuffix(" &").split(" ", 1)
    out = subprocess.run(["bash", "-c", f"printf '%s\\n' {arguments}"], capture_output=True, text=True,
                         check=True).stdout.splitlines()
    assert out == ["-m", "tunerun.trainer", f"{hostile}/{EXAMPLES[0].stem}-20261123-101500"]
    assert not canary.exists()


def test_the_trainer_is_told_how_to_reach_a_store_with_a_private_ca(user_project, monkeypatch):
    """The trainer reads job.yaml before it knows the spec's storage settings: the CA file (on the shared
    filesystem), TLS verification and addressing come on its command line; credentials never do."""
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "this-must-not-appear-anywhere")
    script = rendered(EXAMPLES[0], "storage.ca_bundle=/shared/certs/corp-ca.pem", "storage.verify_tls=false",
                      "storage.addressing_style=path")
    [driver] = [line for line in script.splitlines() if " -m tunerun.trainer " in line]
    words = shlex.split(driver.removesuffix(" &"))
    assert words[4:] == ["--endpoint-url", "https://minio.internal:9000", "--ca-bundle", "/shared/certs/corp-ca.pem",
                         "--no-verify-tls", "--addressing-style", "path"]
    assert "this-must-not-appear-anywhere" not in script


def test_every_node_gets_exactly_its_workers_cpus_and_srun_passes_the_whole_environment(user_project):
    """Ray Train packs workers: a spare logical CPU on the head would draw a second worker there. srun inside
    the job would pass on only sbatch's --export names (not the job's Ray token) without --export=ALL."""
    script = rendered(EXAMPLES[[p.stem for p in EXAMPLES].index("quickstart")], "resources.nodes=3",
                      "resources.workers_per_node=2", "resources.cpus_per_worker=3",
                      "training.global_batch_size=24")
    assert script.count("--num-cpus=6 ") == 2 and "--num-cpus=7" not in script  # head and the other nodes
    srun = next(line for line in script.splitlines() if line.lstrip().startswith("srun "))
    following = script[script.index(srun):].split("\n", 2)[1]
    assert "--export=ALL" in srun + following


def test_a_pinned_interface_carries_ray_and_the_training_collectives(user_project):
    script = rendered(EXAMPLES[0], "targets.slurm.network_interface=ib0")
    pinned = [line for line in script.splitlines() if line.startswith(("node_ip()", "export GLOO_SOCKET_IFNAME"))]
    assert len(pinned) == 2 and "dev ib0" in pinned[0]
    probe = "\n".join([pinned[1], 'printf "%s %s" "$GLOO_SOCKET_IFNAME" "$NCCL_SOCKET_IFNAME"'])
    assert subprocess.run(["bash", "-c", probe], capture_output=True, text=True, check=True).stdout == "ib0 ib0"
    assert "GLOO_SOCKET_IFNAME" not in rendered(EXAMPLES[0])  # unpinned: gloo and NCCL choose as they always do


def test_two_jobs_on_one_node_get_disjoint_ray_ports_inside_the_range(user_project):
    script = rendered(EXAMPLES[0], "targets.slurm.ray_port_min=20000", "targets.slurm.ray_port_max=20100")
    lines = [line for line in script.splitlines() if line.startswith(("PORT=", "DASHBOARD_PORT=", "CLIENT_PORT=",
                                                                      "AGENT_PORT="))]
    assert len(lines) == 4
    assert '--ray-client-server-port="$CLIENT_PORT"' in script and "--dashboard-agent-listen-port=$AGENT_PORT" in script
    ports = {}
    for job_id in (41, 42, 83):  # 83 * 7 % 97 = 96: the highest PORT this range gives
        probe = "\n".join([*lines, 'echo "$PORT $DASHBOARD_PORT $CLIENT_PORT $AGENT_PORT"'])
        out = subprocess.run(["bash", "-c", probe], env={**os.environ, "SLURM_JOB_ID": str(job_id)},
                             capture_output=True, text=True, check=True).stdout
        ports[job_id] = set(map(int, out.split()))
        assert len(ports[job_id]) == 4 and all(20000 <= p <= 20100 for p in ports[job_id]), out
    assert not ports[41] & ports[42]
