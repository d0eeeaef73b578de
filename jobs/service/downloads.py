"""A folder of the run (an adapter, a merged model, a GGUF export) streamed to the client as one tar file.

A merged 8B model is 16 GB: it is never assembled in memory or on the server's disk. A thread writes the tar
stream file by file into a small bounded queue and the response sends what it holds; a client that stops
reading stops the writer. Object storage is read one file at a time through a temporary copy (boto3 downloads
in parts, in parallel), local run folders straight from disk.
"""
from __future__ import annotations

import queue
import tarfile
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

from tunerun.cluster.run_folder import RunFolder

CHUNK = 1 << 20
QUEUED_CHUNKS = 8


class _QueueWriter:
    """What tarfile writes to: chunks into a queue, the writer waiting while the client is slower."""

    def __init__(self, chunks: queue.Queue, stopped: threading.Event):
        self.chunks, self.stopped, self.pending = chunks, stopped, bytearray()

    def write(self, data: bytes) -> int:
        self.pending += data
        while len(self.pending) >= CHUNK:
            self._put(bytes(self.pending[:CHUNK]))
            del self.pending[:CHUNK]
        return len(data)

    def close(self) -> None:
        if self.pending:
            self._put(bytes(self.pending))
        self._put(None)

    def _put(self, item: bytes | None) -> None:
        while not self.stopped.is_set():
            try:
                self.chunks.put(item, timeout=1.0)
                return
            except queue.Full:
                continue
        raise BrokenPipeError("the client stopped reading")


def stream_tar(run: RunFolder, folder: str, top: str) -> Iterator[bytes]:
    """The files below ``folder`` of ``run`` as a tar stream whose entries sit under ``top/``."""
    chunks: queue.Queue = queue.Queue(maxsize=QUEUED_CHUNKS)
    stopped = threading.Event()
    failure: list[BaseException] = []

    def write() -> None:
        out = _QueueWriter(chunks, stopped)
        try:
            with tarfile.open(fileobj=out, mode="w|") as tar:
                for relative in sorted(run.list_files(folder)):
                    _add(tar, run, f"{folder}/{relative}", f"{top}/{relative}")
            out.close()
        except BrokenPipeError:
            pass
        except BaseException as exc:  # noqa: BLE001 — re-raised in the response thread
            failure.append(exc)
            chunks.put(None)

    writer = threading.Thread(target=write, name="tunerun-download", daemon=True)
    writer.start()
    try:
        while (chunk := chunks.get()) is not None:
            yield chunk
        if failure:
            raise failure[0]
    finally:
        stopped.set()


def _add(tar: tarfile.TarFile, run: RunFolder, name: str, arcname: str) -> None:
    if run.is_local:
        tar.add(run.local_path(name), arcname=arcname, recursive=False)
        return
    with tempfile.TemporaryDirectory(prefix="tunerun-download-") as scratch:
        local = run.download(name, Path(scratch) / "file")
        tar.add(local, arcname=arcname, recursive=False)
