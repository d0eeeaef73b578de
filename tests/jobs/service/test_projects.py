"""Projects in server.yaml: their limits (429 beyond ``max_queued``), the catalog models each may train, where their
jobs go (the targets' own settings, overridden per project), and hostile values refused with the field named."""
from __future__ import annotations

import openai
import pytest
from service_calls import TICKETS, client, upload

from tunerun.cluster.slurm import render_sbatch
from tunerun.cluster.targets import job_model
from tunerun.jobs.errors import SpecError
from tunerun.jobs.loader import load_job
from tunerun.jobs.plan import resolve
from tunerun.jobs.service.config import load_server_config

SERVER = """\
storage: {uri: ./runs}
models:
  support-tiny: {job: support.yaml}
  support-large: {job: support.yaml}
uploads: {max_file_bytes: 200000}
projects:
  acme: {max_queued: 2, models: [support-tiny],
         kubernetes: {queue: acme-queue}, slurm: {account: acme, qos: normal, partition: gpu}}
"""


@pytest.fixture
def served(served, tmp_path):
    """The service's catalog (conftest.py) with a second model and project acme's block."""
    (tmp_path / "server.yaml").write_text(SERVER)
    return load_server_config(tmp_path / "server.yaml")


def create(app, key: str, project: str, model: str = "support-tiny") -> str:
    found = upload(app, key, project, TICKETS)
    return client(app, key).fine_tuning.jobs.create(model=model, training_file=found.id).id


def test_a_job_beyond_the_projects_max_queued_is_429_in_openais_shape_and_other_projects_go_on(app, keys):
    first, _ = create(app, keys["acme"], "acme"), create(app, keys["acme"], "acme")
    with pytest.raises(openai.RateLimitError) as caught:
        create(app, keys["acme"], "acme")
    error = caught.value
    assert error.status_code == 429 and error.code == "rate_limit_exceeded" and error.param is None
    assert "Project acme already has 2 jobs waiting" in error.message and "max_queued: 2" in error.message
    assert error.response.headers["x-should-retry"] == "false"  # waiting a second will not free the queue
    assert set(error.body) == {"message", "type", "param", "code"}
    create(app, keys["other"], "other")  # not listed: no queue limit of its own
    client(app, keys["acme"]).fine_tuning.jobs.cancel(first)
    create(app, keys["acme"], "acme")  # a cancelled job waits no more


def test_a_project_trains_only_the_catalog_models_it_is_given(app, keys):
    with pytest.raises(openai.NotFoundError) as caught:
        create(app, keys["acme"], "acme", model="support-large")
    assert caught.value.param == "model" and "not available to project acme" in caught.value.message
    assert "support-tiny" in caught.value.message
    create(app, keys["other"], "other", model="support-large")  # not listed: every catalog model
    assert [m.id for m in client(app, keys["acme"]).models.list()] == ["support-tiny"]  # what it may use
    assert [m.id for m in client(app, keys["other"]).models.list()][:2] == ["support-tiny", "support-large"]
    with pytest.raises(openai.NotFoundError):  # nor call it
        client(app, keys["acme"]).chat.completions.create(model="support-large", messages=[{"role": "user",
                                                                                           "content": "hi"}])


def test_a_projects_placement_overrides_the_targets_settings_for_its_jobs_only(served, tmp_path):
    config = served.config
    placed = config.targets_for("acme")
    assert placed["k8s"]["namespace"] == "acme" and placed["k8s"]["queue"] == "acme-queue"  # the project's name
    assert config.targets_for("other") == config.targets.model_dump()
    # what the service resolves a request into (JobService._resolved_job): the template with these targets
    spec = load_job(str(tmp_path / "support.yaml"), [f"data.train={TICKETS}"], model=job_model())
    job = resolve(spec.model_copy(update={"storage": config.storage, "targets": placed}), run_id="r-1")
    lines = [line for line in render_sbatch(job).splitlines() if line.startswith("#SBATCH")]
    assert {"#SBATCH --account=acme", "#SBATCH --qos=normal", "#SBATCH --partition=gpu"} <= set(lines)


@pytest.mark.parametrize("project, field, says", [
    ("acme: {kubernetes: {queue: 'q; kubectl delete ns acme'}}", "projects.acme.kubernetes.queue",
     "not a valid object name"),
    ("acme: {kubernetes: {queue: 'q: {a: b}'}}", "projects.acme.kubernetes.queue", "not a valid object name"),
    ("acme: {kubernetes: {namespace: Acme Team}}", "projects.acme.kubernetes.namespace", "try 'acme-team'"),
    ("acme-: {kubernetes: {queue: q}}", "projects.acme-.kubernetes.namespace", "cannot name a namespace"),
    ("Acme_Team: {}", "projects.Acme_Team", "not a project name"),
    ("acme: {slurm: {account: 'acme --qos=high'}}", "projects.acme.slurm.account", "cannot stand on an #SBATCH line"),
    ('acme: {slurm: {partition: "gpu\\n#SBATCH --uid=0"}}', "projects.acme.slurm.partition", "control characters"),
    ("acme: {slurm: {qos: '$(reboot)'}}", "projects.acme.slurm.qos", "no spaces, quotes or '$'"),
    ("acme: {models: [support-tiy]}", "projects.acme.models", "did you mean 'support-tiny'"),
    ("acme: {max_queued: -1}", "projects.acme.max_queued", "must be ≥ 0"),
])
def test_hostile_project_values_are_refused_with_the_field_named(tmp_path, monkeypatch, project, field, says):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "support.yaml").write_text("name: support\nmodel: {path: m}\n")
    (tmp_path / "server.yaml").write_text(
        f'storage: {{uri: ./runs}}\nmodels:\n  support-tiny: {{job: support.yaml}}\nprojects:\n  {project}\n')
    with pytest.raises(SpecError) as caught:
        load_server_config(tmp_path / "server.yaml")
    assert any(p.path == field and says in p.message for p in caught.value.problems), str(caught.value)
