"""A run folder on an S3 store behind TLS with a private CA, as on-prem MinIO / Ceph RGW usually are: moto's S3
server on loopback with a certificate signed by a CA this test makes, trusted by nothing but ``storage.ca_bundle``.

The trainer reads job.yaml before it knows the spec's storage settings, so the target must hand it what that
read needs on the command line (`trainer_command`); the quick tests prove that read, the slow one a whole run.
"""
from __future__ import annotations

import datetime
import ipaddress
import json
import os
import signal
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest

from tunerun.cluster import s3
from tunerun.cluster.runs import create_run
from tunerun.cluster.targets import trainer_command
from tunerun.jobs.errors import StorageError
from tunerun.jobs.loader import load_job
from tunerun.jobs.plan import resolve
from tunerun.cluster.run_folder import read_job
from tunerun.trainer.entrypoint import run_folder_from_argv

REPO = Path(__file__).resolve().parents[2]
QUICKSTART = REPO / "jobs" / "examples" / "quickstart.yaml"
TRAIN_DATA = REPO / "examples" / "data" / "support_tickets.jsonl"


def write_ca_and_server_certificate(folder: Path) -> tuple[Path, Path, Path]:
    """A private CA (ca.pem) and a certificate for 127.0.0.1 it signed (server.pem, server.key)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    valid = {"not_valid_before": now - datetime.timedelta(hours=1), "not_valid_after": now + datetime.timedelta(days=1)}
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "tunerun test CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(valid["not_valid_before"])
          .not_valid_after(valid["not_valid_after"])
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                       content_commitment=False, key_encipherment=False, data_encipherment=False,
                                       key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
          .sign(ca_key, hashes.SHA256()))
    server = (x509.CertificateBuilder()
              .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
              .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
              .not_valid_before(valid["not_valid_before"]).not_valid_after(valid["not_valid_after"])
              .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                             critical=False)
              .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
              .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
              .sign(ca_key, hashes.SHA256()))
    paths = folder / "ca.pem", folder / "server.pem", folder / "server.key"
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(server.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return paths


class TlsS3Server:
    def __init__(self, process: subprocess.Popen, endpoint: str, ca_bundle: Path):
        self.process, self.endpoint, self.ca_bundle = process, endpoint, ca_bundle

    def bucket(self) -> str:
        import boto3

        name = f"runs-{uuid.uuid4().hex[:10]}"
        boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1",
                     verify=str(self.ca_bundle)).create_bucket(Bucket=name)
        return name


@pytest.fixture(scope="module")
def tls_s3(tmp_path_factory, free_port):
    """moto's S3 server over HTTPS only, its certificate signed by a CA of this test; test credentials in the
    environment (the server takes any)."""
    folder = tmp_path_factory.mktemp("tls-s3")
    ca, cert, key = write_ca_and_server_certificate(folder)
    saved = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")}
    os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1")
    port = free_port()
    with (folder / "moto.log").open("wb") as log:
        process = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port),
                                    "-c", str(cert), "-k", str(key)], stdout=log, stderr=subprocess.STDOUT)
    endpoint = f"https://127.0.0.1:{port}"
    trusting = ssl.create_default_context(cafile=str(ca))
    deadline = time.monotonic() + 30
    while True:
        try:
            urllib.request.urlopen(endpoint, timeout=1, context=trusting)
            break
        except urllib.error.HTTPError:  # any HTTP answer means it is up
            break
        except OSError:
            assert process.poll() is None and time.monotonic() < deadline, (folder / "moto.log").read_text()
            time.sleep(0.2)
    yield TlsS3Server(process, endpoint, ca)
    process.send_signal(signal.SIGTERM)
    process.wait(timeout=10)
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


def tls_job(tls_s3: TlsS3Server, model: Path, *overrides: str, run_id: str):
    sets = [f"model.path={model}", f"data.train={TRAIN_DATA}", f"storage.uri=s3://{tls_s3.bucket()}/team",
            f"storage.endpoint_url={tls_s3.endpoint}", *overrides]
    return resolve(load_job(str(QUICKSTART), sets), run_id=run_id)


def trainer_argv(job) -> list[str]:
    """What the target starts, less ``python -m tunerun.trainer``: the trainer's own command line."""
    command = trainer_command(job)
    assert command[:3] == ["python", "-m", "tunerun.trainer"]
    return command[3:]


def test_the_trainer_reads_its_job_over_tls_trusting_only_the_ca_bundle(tls_s3, stub_model_dir, monkeypatch):
    job = tls_job(tls_s3, stub_model_dir, f"storage.ca_bundle={tls_s3.ca_bundle}", run_id="ca")
    create_run(job, "local")
    for name in ("AWS_CA_BUNDLE", "REQUESTS_CA_BUNDLE", "SSL_CERT_FILE"):
        monkeypatch.delenv(name, raising=False)  # the CA reaches the trainer through its command line alone
    argv = trainer_argv(job)
    assert argv[argv.index("--ca-bundle") + 1] == str(tls_s3.ca_bundle)
    assert read_job(run_folder_from_argv(argv)) == job

    monkeypatch.setattr(s3, "MAX_ATTEMPTS", 1)  # a certificate that fails once fails every time
    without = [arg for arg in argv if arg not in ("--ca-bundle", str(tls_s3.ca_bundle))]
    with pytest.raises(StorageError, match=r"read ca/job\.yaml from s3://.*: its TLS certificate is not signed by "
                                           r"the system's CAs .*set storage\.ca_bundle"):
        read_job(run_folder_from_argv(without))


@pytest.mark.filterwarnings("ignore:Unverified HTTPS request")
def test_with_verify_tls_off_the_trainer_reads_its_job_without_the_ca(tls_s3, stub_model_dir):
    job = tls_job(tls_s3, stub_model_dir, "storage.verify_tls=false", "storage.addressing_style=path",
                  run_id="no-verify")
    create_run(job, "local")
    argv = trainer_argv(job)
    assert "--ca-bundle" not in argv and "--no-verify-tls" in argv
    run = run_folder_from_argv(argv)
    assert run.storage.addressing_style == "path"
    with pytest.warns(Warning, match="Unverified HTTPS request"):  # urllib3 says so on every request
        assert read_job(run) == job


@pytest.mark.slow
def test_a_local_run_trains_with_its_run_folder_on_the_tls_store(tls_s3, tiny_model_dir, tmp_path, tunerun):
    """`tunerun run` on the embedded Ray: the driver reads job.yaml, the workers and Ray Train's pyarrow
    filesystem write checkpoints, all over TLS trusting the private CA only through ``storage.ca_bundle``."""
    bucket = tls_s3.bucket()
    sets = [f"model.path={tiny_model_dir}", f"data.train={TRAIN_DATA}", f"storage.uri=s3://{bucket}/team",
            f"storage.endpoint_url={tls_s3.endpoint}", f"storage.ca_bundle={tls_s3.ca_bundle}",
            "training.max_steps=4", "checkpoint.every_steps=2", "eval.every_steps=2"]
    env = {k: v for k, v in os.environ.items() if k not in ("AWS_CA_BUNDLE", "REQUESTS_CA_BUNDLE", "SSL_CERT_FILE")}
    result = tunerun("run", str(QUICKSTART), *[a for s in sets for a in ("--set", s)], "--run-id", "tls",
                     cwd=tmp_path, env=env, timeout=900)
    assert result.returncode == 0, result.stdout + result.stderr
    import boto3

    store = boto3.client("s3", endpoint_url=tls_s3.endpoint, region_name="us-east-1", verify=str(tls_s3.ca_bundle))
    info = json.loads(store.get_object(Bucket=bucket, Key="team/tls/run.json")["Body"].read())
    assert info["state"] == "succeeded"
    keys = [item["Key"] for item in store.list_objects_v2(Bucket=bucket, Prefix="team/tls/")["Contents"]]
    assert any(key.startswith("team/tls/checkpoints/") and key.endswith("manifest.json") for key in keys), keys
