"""The service's app in this process (no training): a catalog of one stub model, two projects' keys."""
from __future__ import annotations

import pytest
from service_calls import TEMPLATE

from tunerun.jobs.service.app import create_app
from tunerun.jobs.service.config import load_server_config
from tunerun.jobs.service.keys import KeyStore


@pytest.fixture
def served(tmp_path, stub_model_dir, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "support.yaml").write_text(TEMPLATE.replace("MODEL", str(stub_model_dir)))
    (tmp_path / "server.yaml").write_text(
        "storage: {uri: ./runs}\nmodels:\n  support-tiny: {job: support.yaml}\nuploads: {max_file_bytes: 200000}\n")
    return load_server_config(tmp_path / "server.yaml")


@pytest.fixture
def app(served):
    app = create_app(served)
    yield app
    # The storage is ./runs in the test's directory: a validation still running when the next test has changed
    # directory would write its verdict into that test's storage.
    validator = app.state.service.validator
    validator.shutdown()
    validator.pool.shutdown(wait=True)


@pytest.fixture
def keys(served):
    store = KeyStore(served.config.storage)
    return {"acme": store.create("acme")[1], "other": store.create("other")[1]}
