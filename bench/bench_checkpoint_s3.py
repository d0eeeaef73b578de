"""Checkpoint save + upload to S3, and restore, against a plain boto3 multipart upload of the same bytes.

    python bench/bench_checkpoint_s3.py [--mib 256] [--files 4] [--repeat 3] [--quick]

Starts an S3 protocol server (moto) on loopback. tunerun's path is what a checkpoint costs in a run: the upload
tunerun hands Ray Train as `checkpoint_upload_fn` (`CheckpointUpload`: boto3, several files at a time, each hashed
with sha256 for the manifest in the read that feeds its upload), the size check on the store and the manifest;
restore = list, read the manifest, download and verify (each file hashed as it is written). "pyarrow save" is
Ray's default upload (pyarrow's S3 filesystem) with a separate hash pass, which tunerun used before.
The baseline is boto3's `upload_file` and `download_file` of the same files, one after the other, with the same
transfer settings (part size, threads). Ray Train and tunerun are imported before anything is timed, as in a run.
Prints MiB/s for both and the ratios (target ≥ 0.9 of the baseline's throughput). `--quick`: 16 MiB, one repeat.
"""
from __future__ import annotations

import argparse
import importlib
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path


def start_server() -> tuple[subprocess.Popen, str]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    process = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    for _ in range(150):
        try:
            urllib.request.urlopen(endpoint, timeout=1)
            break
        except urllib.error.HTTPError:
            break
        except OSError:
            time.sleep(0.2)
    return process, endpoint


def make_checkpoint(folder: Path, mib: int, files: int) -> int:
    folder.mkdir(parents=True)
    per_file = mib * 1024 * 1024 // files
    for i in range(files):
        (folder / f"shard-{i}.pt").write_bytes(os.urandom(per_file))
    return per_file * files


def tunerun_save(run, name: str, local: Path, storage) -> None:
    """What `loop._write_checkpoint` does around ray.train.report on object storage: upload (hashing each file in
    the same read), then the manifest from the upload's digests."""
    import ray.train

    from tunerun.cluster import run_folder
    from tunerun.trainer import checkpoint as ckpt

    upload = ckpt.uploader(run)
    upload(ray.train.Checkpoint.from_directory(str(local)), name)
    run_folder.write_manifest(run, name, 1, upload.digests)


def pyarrow_save(run, name: str, local: Path, storage) -> None:
    """The same with Ray Train's default upload (pyarrow copy_files), as tunerun did before."""
    import pyarrow.fs

    from tunerun.cluster.s3 import pyarrow_filesystem, split_uri
    from tunerun.cluster import run_folder
    from tunerun.trainer import checkpoint as ckpt

    digests = ckpt.file_digests(local)
    bucket, prefix = split_uri(storage.uri)
    pyarrow.fs.copy_files(str(local), f"{bucket}/{prefix}/{run.run_id}/{name}",
                          destination_filesystem=pyarrow_filesystem(storage))
    run_folder.write_manifest(run, name, 1, digests)


def boto3_upload(client, bucket: str, key: str, local: Path) -> None:
    from tunerun.cluster.s3 import _transfer_config

    for path in sorted(local.iterdir()):
        client.upload_file(str(path), bucket, f"{key}/{path.name}", Config=_transfer_config(path.stat().st_size))


def boto3_download(client, bucket: str, key: str, local: Path) -> None:
    from tunerun.cluster.s3 import _transfer_config

    for item in client.list_objects_v2(Bucket=bucket, Prefix=key + "/")["Contents"]:
        client.download_file(bucket, item["Key"], str(local / Path(item["Key"]).name),
                             Config=_transfer_config(item["Size"]))


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def one_round(label: str, local: Path, storage, s3, scratch: Path) -> dict[str, float]:
    """Seconds each way takes to save and restore the checkpoint in ``local``, each into its own folder."""
    from tunerun.cluster.run_folder import RunFolder
    from tunerun.trainer.checkpoint import latest_complete

    name, run = "checkpoints/step-000001", RunFolder(storage, f"run-{label}")
    restore, plain = scratch / f"restore-{label}", scratch / f"plain-{label}"
    plain.mkdir()
    seconds = {
        "tunerun save": timed(lambda: tunerun_save(run, name, local, storage)),
        "pyarrow save": timed(lambda: pyarrow_save(RunFolder(storage, f"pyarrow-{label}"), name, local, storage)),
        "boto3 upload": timed(lambda: boto3_upload(s3, "bench", f"plain/{label}", local)),
        "tunerun restore": timed(lambda: latest_complete(run, restore)),
        "boto3 download": timed(lambda: boto3_download(s3, "bench", f"plain/{label}", plain)),
    }
    shutil.rmtree(restore, ignore_errors=True)
    shutil.rmtree(plain, ignore_errors=True)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=256)
    parser.add_argument("--files", type=int, default=4)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="a smoke run: 16 MiB, one repeat")
    args = parser.parse_args()
    if args.quick:
        args.mib, args.repeat = 16, 1
    os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1")
    process, endpoint = start_server()
    scratch = Path(tempfile.mkdtemp(prefix="tunerun-bench-"))
    try:
        importlib.import_module("ray.train")  # a run has it imported long before its first checkpoint

        from tunerun.cluster.s3 import client
        from tunerun.jobs.spec import StorageSpec

        storage = StorageSpec(uri="s3://bench/runs", endpoint_url=endpoint)
        s3 = client(storage)
        s3.create_bucket(Bucket="bench")
        size = make_checkpoint(scratch / "ckpt", args.mib, args.files)
        mib = size / 1024**2
        # A run makes its clients and thread pools once, at its first checkpoint: a small round makes them here.
        make_checkpoint(scratch / "warm", 1, args.files)
        one_round("warm", scratch / "warm", storage, s3, scratch)
        rounds = [one_round(str(i), scratch / "ckpt", storage, s3, scratch) for i in range(args.repeat)]
        print(f"checkpoint of {mib:.0f} MiB in {args.files} files, S3 server on loopback, {args.repeat} repeats")
        rate = {}
        for name in rounds[0]:
            median = statistics.median(r[name] for r in rounds)
            rate[name] = mib / median
            print(f"  {name:16s} median {median:6.2f} s   {rate[name]:7.1f} MiB/s")
        print(f"ratio save/upload      {rate['tunerun save'] / rate['boto3 upload']:.2f} (target >= 0.9)")
        print(f"  with Ray's default pyarrow upload instead: {rate['pyarrow save'] / rate['boto3 upload']:.2f}")
        print(f"ratio restore/download {rate['tunerun restore'] / rate['boto3 download']:.2f} (target >= 0.9)")
    finally:
        os.kill(process.pid, signal.SIGTERM)
        process.wait(timeout=10)
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
