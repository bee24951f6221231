"""Result storage behind one small interface: Redis, a local folder, or an S3-compatible store.

Results are encoded images (PNG, JPEG or WebP: the job's output_format). RedisStore (default):
the bytes under keys.image(job, k) with a TTL, next to the job record, so a deployment needs
nothing but Redis. FileStore: <dir>/<job>/<k>.<format> (0.png, 0.jpeg, 0.webp), written to a
temporary name and renamed (a reader never sees half a file; a re-run after a crash rewrites the
same name, so there is still one result per image); expiry by file age, swept by the worker.
S3Store (jobs/s3store.py): objects <prefix><job>/<k>.<format> in a bucket, expired by a lifecycle
rule; Redis keeps only job records. Torch-free: the API reads images through JobClient.image_bytes.

File and object names carry the real extension, so whoever lists the folder or the bucket (or
downloads an object) sees what each one is. put() takes it from the bytes' own signature; readers
pass the format the job asked for (its spec's output_format, which is what the worker encoded),
so a read is still one lookup.

A store that cannot be reached raises StoreError: the worker fails that job (code
`storage_error`) and goes on; the API answers 503.
"""
from __future__ import annotations

import os
import re
import shutil
import tempfile
import time
from typing import Protocol

from latentd.jobs import keys
from latentd.jobs.encode import MEDIA_TYPES, extension
from latentd.jobs.errors import StoreError

_ID = re.compile(r"^[0-9a-f]{32}$")


class Store(Protocol):
    def put(self, job_id: str, k: int, data: bytes, ttl_s: int) -> None: ...
    def get(self, job_id: str, k: int, fmt: str) -> bytes | None: ...
    def sweep(self) -> int: ...
    def prepare(self) -> None: ...


class RedisStore:
    def __init__(self, redis):
        self.redis = redis

    def put(self, job_id: str, k: int, data: bytes, ttl_s: int) -> None:
        self.redis.set(keys.image(job_id, k), data, ex=max(1, int(ttl_s)))

    def get(self, job_id: str, k: int, fmt: str) -> bytes | None:
        return self.redis.get(keys.image(job_id, k))     # one key per image, whatever its format

    def sweep(self) -> int:
        return 0  # Redis expires keys itself

    def prepare(self) -> None:
        pass


class FileStore:
    def __init__(self, root: str, ttl_s: int = 86400):
        self.root = os.path.abspath(os.path.expanduser(root))
        self.ttl_s = ttl_s
        os.makedirs(self.root, exist_ok=True)

    def _path(self, job_id: str, k: int, fmt: str) -> str:
        if not _ID.match(job_id) or not isinstance(k, int) or k < 0 or fmt not in MEDIA_TYPES:
            raise ValueError("bad job id, image index or format")   # never a path from user input
        return os.path.join(self.root, job_id, f"{k}.{fmt}")

    def put(self, job_id: str, k: int, data: bytes, ttl_s: int) -> None:
        path = self._path(job_id, k, extension(data))
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), suffix=".tmp")
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        except OSError as e:
            raise StoreError(f"image folder {self.root}: {e}") from e

    def prepare(self) -> None:
        pass

    def get(self, job_id: str, k: int, fmt: str) -> bytes | None:
        try:
            path = self._path(job_id, k, fmt)
            if time.time() - os.path.getmtime(path) > self.ttl_s:
                return None
            with open(path, "rb") as f:
                return f.read()
        except (OSError, ValueError):
            return None

    def sweep(self) -> int:
        """Delete job folders older than the TTL; returns how many."""
        gone = 0
        cutoff = time.time() - self.ttl_s
        for name in os.listdir(self.root):
            path = os.path.join(self.root, name)
            try:
                if _ID.match(name) and os.path.getmtime(path) < cutoff:
                    shutil.rmtree(path, ignore_errors=True)
                    gone += 1
            except OSError:
                pass
        return gone


def make_store(redis, settings) -> Store:
    """The store named by settings.storage (redis | file | s3)."""
    if settings.storage == "redis":
        return RedisStore(redis)
    if settings.storage == "file":
        return FileStore(settings.storage_dir, settings.result_ttl_s)
    if settings.storage == "s3":
        from latentd.jobs.s3store import S3Store

        return S3Store(settings)
    raise ValueError(f"LATENTD_STORAGE must be redis, file or s3, got {settings.storage!r}")
