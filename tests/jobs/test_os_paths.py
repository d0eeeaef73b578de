"""Values the operating system would refuse as paths are spec errors naming the field (exit 2), never an
internal error met later: a name over 255 bytes, a path over PATH_MAX, a NUL byte."""
from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
QUICKSTART = REPO / "jobs" / "examples" / "quickstart.yaml"


@pytest.mark.parametrize("field", ["model.path", "data.train", "data.eval", "storage.uri", "eval.general"])
def test_a_5000_character_path_is_a_user_error_naming_the_field(field, tunerun, tmp_path):
    result = tunerun("validate", str(QUICKSTART), "--set", f"{field}={tmp_path / ('a' * 5000)}", cwd=tmp_path)
    assert result.returncode == 2, result.stdout + result.stderr
    assert f"{field}: the name 'aaaaaaaaaaaa…aaaaaaaa' is 5000 bytes" in result.stderr
    assert "at most 255 bytes" in result.stderr
    assert "Traceback" not in result.stdout + result.stderr and "internal error" not in result.stderr


def test_a_path_longer_than_path_max_is_refused_with_the_limit(tunerun, tmp_path):
    deep = "/" + "/".join(["d" * 200] * 25)  # every name allowed, the whole path not
    result = tunerun("validate", str(QUICKSTART), "--set", f"model.path={deep}", cwd=tmp_path)
    assert result.returncode == 2
    assert "model.path: is 5025 bytes as an absolute path" in result.stderr and "at most 4095" in result.stderr


def test_a_nul_byte_in_a_path_is_refused_once(tunerun, tmp_path):
    spec = tmp_path / "job.yaml"
    spec.write_text(f'model: {{path: "{tmp_path}/m\\0odel"}}\ndata: {{train: data.jsonl}}\n')
    result = tunerun("validate", str(spec), cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.count("model.path") == 1 and "control characters" in result.stderr


def test_a_run_id_the_filesystem_cannot_hold_is_refused(tunerun, tmp_path, stub_model_dir):
    data = tmp_path / "d.jsonl"
    data.write_text('{"text": "hello"}\n')
    result = tunerun("render", str(QUICKSTART), "--target", "k8s", "--set", f"model.path={stub_model_dir}",
                     "--set", f"data.train={data}", "--run-id", "r" * 300, cwd=tmp_path)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "--run-id: the name" in result.stderr and "300 bytes" in result.stderr
