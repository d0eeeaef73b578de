"""Checkpoint save + upload to S3, and restore, against a plain boto3 multipart upload of the same bytes.

    python bench/bench_checkpoint_s3.py [--mib 256] [--files 4] [--repeat 3]

Starts an S3 protocol server (moto) on loopback. tunerun's path is what a checkpoint costs in a run: hash the
files (sha256, for the manifest) beside the upload tunerun hands Ray Train as `checkpoint_upload_fn` (boto3
multipart), check sizes on the store and write the manifest; restore = list, download and verify. "pyarrow save"
is the same with Ray's default upload (pyarrow's S3 filesystem), which tunerun used before.
The baseline is boto3's `upload_file` (multipart, 4 threads) and `download_file` of the same files.
Prints MiB/s for both and the ratio (target ≥ 0.8 of the baseline's throughput).
"""
from __future__ import annotations

import argparse
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
    """What `loop._save_checkpoint` does around ray.train.report: hash beside the upload, then the manifest."""
    from concurrent.futures import ThreadPoolExecutor

    import ray.train

    from tunerun.cluster import run_folder

    from tunerun.trainer import checkpoint as ckpt

    with ThreadPoolExecutor(1) as hasher:
        hashing = hasher.submit(ckpt.file_digests, local)
        ckpt.uploader(run)(ray.train.Checkpoint.from_directory(str(local)), name)
        digests = hashing.result()
    run_folder.write_manifest(run, name, 1, digests)


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
        client.upload_file(str(path), bucket, f"{key}/{path.name}", Config=_transfer_config())


def boto3_download(client, bucket: str, key: str, local: Path) -> None:
    from tunerun.cluster.s3 import _transfer_config

    for item in client.list_objects_v2(Bucket=bucket, Prefix=key + "/")["Contents"]:
        client.download_file(bucket, item["Key"], str(local / Path(item["Key"]).name), Config=_transfer_config())


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=256)
    parser.add_argument("--files", type=int, default=4)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1")
    process, endpoint = start_server()
    scratch = Path(tempfile.mkdtemp(prefix="tunerun-bench-"))
    try:
        from tunerun.cluster.s3 import client
        from tunerun.cluster.run_folder import RunFolder
        from tunerun.jobs.spec import StorageSpec
        from tunerun.trainer.checkpoint import latest_complete

        storage = StorageSpec(uri="s3://bench/runs", endpoint_url=endpoint)
        s3 = client(storage)
        s3.create_bucket(Bucket="bench")
        size = make_checkpoint(scratch / "ckpt", args.mib, args.files)
        mib = size / 1024**2
        rows = {"tunerun save": [], "pyarrow save": [], "boto3 upload": [], "tunerun restore": [],
                "boto3 download": []}
        for i in range(args.repeat):
            run = RunFolder(storage, f"run-{i}")
            rows["tunerun save"].append(timed(lambda: tunerun_save(run, "checkpoints/step-000001",
                                                                   scratch / "ckpt", storage)))
            rows["pyarrow save"].append(timed(lambda: pyarrow_save(RunFolder(storage, f"pyarrow-{i}"),
                                                                   "checkpoints/step-000001", scratch / "ckpt",
                                                                   storage)))
            rows["boto3 upload"].append(timed(lambda: boto3_upload(s3, "bench", f"plain/{i}", scratch / "ckpt")))
            restore = scratch / f"restore-{i}"
            rows["tunerun restore"].append(timed(lambda: latest_complete(run, restore)))
            plain = scratch / f"plain-{i}"
            plain.mkdir()
            rows["boto3 download"].append(timed(lambda: boto3_download(s3, "bench", f"plain/{i}", plain)))
            shutil.rmtree(restore, ignore_errors=True)
            shutil.rmtree(plain, ignore_errors=True)
        print(f"checkpoint of {mib:.0f} MiB in {args.files} files, S3 server on loopback, {args.repeat} repeats")
        rate = {name: mib / statistics.median(times) for name, times in rows.items()}
        for name, times in rows.items():
            print(f"  {name:16s} median {statistics.median(times):6.2f} s   {rate[name]:7.1f} MiB/s")
        print(f"ratio save/upload      {rate['tunerun save'] / rate['boto3 upload']:.2f} (target >= 0.8)")
        print(f"  with Ray's default pyarrow upload instead: {rate['pyarrow save'] / rate['boto3 upload']:.2f}")
        print(f"ratio restore/download {rate['tunerun restore'] / rate['boto3 download']:.2f}")
    finally:
        os.kill(process.pid, signal.SIGTERM)
        process.wait(timeout=10)
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
