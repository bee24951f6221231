"""S3Store: images in an S3-compatible object store (LATENTD_STORAGE=s3), through boto3.

Why: images in Redis cost memory for the whole result TTL (about 35 GB for one 512x512 PNG a
second kept 24 h) and a local folder is one host's. With S3 the images live at
`s3://<bucket>/<prefix><job id>/<k>.<format>` (0.png, 0.jpeg, 0.webp: the job's output_format,
with its Content-Type) and Redis keeps only the job records.

- Credentials come from boto3's standard chain (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY,
  AWS_PROFILE, web identity / IRSA, the instance role): never a LATENTD_ setting.
- Expiry is the bucket's lifecycle rule (object stores expire in whole days, not by TTL). With
  LATENTD_S3_EXPIRE_DAYS=N the worker keeps one rule, id `latentd-expire:<prefix>`, that expires
  the prefix after N days, leaving the bucket's other rules as they are; with 0 (default) it
  only warns when no enabled rule covers the prefix. The API never serves an image whose job
  record has expired (LATENTD_RESULT_TTL_S), so N = ceil(result TTL in days) loses nothing.
- Reads go through the API (auth, signed URLs as with the other stores), or, with
  LATENTD_S3_PRESIGN=true, clients get the store's presigned GET URLs (valid LATENTD_URL_TTL_S),
  signed for LATENTD_S3_PRESIGN_ENDPOINT_URL when clients reach the store by another address.
- Short timeouts and few retries: an unreachable store fails the job in seconds with a clear
  StoreError (code `storage_error`) instead of holding the worker.
Torch-free (the API uses it for reads and presigning).
"""
from __future__ import annotations

import logging
import re

from latentd.jobs.encode import MEDIA_TYPES, extension
from latentd.jobs.errors import StoreError

log = logging.getLogger("latentd.store")
_ID = re.compile(r"^[0-9a-f]{32}$")
_MISSING = ("NoSuchKey", "404", "NotFound")


class S3Store:
    def __init__(self, settings):
        import boto3
        from botocore.config import Config

        if not settings.s3_bucket:
            raise ValueError("LATENTD_S3_BUCKET must name a bucket when LATENTD_STORAGE=s3")
        self.bucket = settings.s3_bucket
        self.prefix = settings.s3_prefix or ""
        self.expire_days = int(settings.s3_expire_days)
        self.where = f"s3://{self.bucket}/{self.prefix}" + (
            f" at {settings.s3_endpoint_url}" if settings.s3_endpoint_url else "")
        cfg = Config(connect_timeout=2, read_timeout=10, signature_version="s3v4",
                     retries={"max_attempts": 2, "mode": "standard"},
                     # path-style for custom endpoints (MinIO, Ceph, a local server): no DNS per bucket
                     s3={"addressing_style": "path" if settings.s3_endpoint_url else "auto"})
        session = boto3.session.Session()
        self.client = session.client("s3", endpoint_url=settings.s3_endpoint_url or None,
                                     region_name=settings.s3_region or None, config=cfg)
        # a presigned URL's signature covers its host: sign with the name clients reach the store
        # by when that differs from the workers' (e.g. http://minio:9000 inside, https outside)
        public = settings.s3_presign_endpoint_url
        self.presigner = self.client if not public else session.client(
            "s3", endpoint_url=public, region_name=settings.s3_region or None,
            config=cfg.merge(Config(s3={"addressing_style": "path"})))
        from botocore.exceptions import BotoCoreError, ClientError

        self._errors = (BotoCoreError, ClientError)
        self._client_error = ClientError

    def key(self, job_id: str, k: int, fmt: str) -> str:
        if not _ID.match(job_id or "") or not isinstance(k, int) or k < 0 or fmt not in MEDIA_TYPES:
            raise ValueError("bad job id, image index or format")   # never a key from user input
        return f"{self.prefix}{job_id}/{k}.{fmt}"

    def _fail(self, what: str, e: Exception) -> StoreError:
        return StoreError(f"object store {self.where}: {what} failed: {e}"[:500])

    def put(self, job_id: str, k: int, data: bytes, ttl_s: int) -> None:
        fmt = extension(data)
        try:
            self.client.put_object(Bucket=self.bucket, Key=self.key(job_id, k, fmt), Body=data,
                                   ContentType=MEDIA_TYPES[fmt])
        except self._errors as e:
            raise self._fail("write", e) from e

    def get(self, job_id: str, k: int, fmt: str) -> bytes | None:
        try:
            obj = self.client.get_object(Bucket=self.bucket, Key=self.key(job_id, k, fmt))
            return obj["Body"].read()
        except ValueError:
            return None
        except self._client_error as e:
            if e.response.get("Error", {}).get("Code") in _MISSING:
                return None          # expired by the lifecycle rule, or never written
            raise self._fail("read", e) from e
        except self._errors as e:
            raise self._fail("read", e) from e

    def presigned_url(self, job_id: str, k: int, fmt: str, ttl_s: int) -> str:
        """A GET URL signed with the store's credentials (computed locally, no round trip)."""
        return self.presigner.generate_presigned_url(
            "get_object", Params={"Bucket": self.bucket, "Key": self.key(job_id, k, fmt)},
            ExpiresIn=int(ttl_s))

    def sweep(self) -> int:
        return 0      # the bucket's lifecycle rule expires objects

    # --- lifecycle ---------------------------------------------------------------------------
    @property
    def rule_id(self) -> str:
        return f"latentd-expire:{self.prefix}"[:255]

    def rules(self) -> list[dict]:
        try:
            return self.client.get_bucket_lifecycle_configuration(Bucket=self.bucket)["Rules"]
        except self._client_error as e:
            if e.response.get("Error", {}).get("Code") == "NoSuchLifecycleConfiguration":
                return []
            raise

    def prepare(self) -> None:
        """Worker start: set (LATENTD_S3_EXPIRE_DAYS > 0) or check the prefix's expiry rule.
        A store that cannot be reached now is logged, not fatal: each job then fails clearly."""
        try:
            rules = self.rules()
            if self.expire_days > 0:
                mine = {"ID": self.rule_id, "Status": "Enabled", "Filter": {"Prefix": self.prefix},
                        "Expiration": {"Days": self.expire_days}}
                kept = [r for r in rules if r.get("ID") != self.rule_id]
                self.client.put_bucket_lifecycle_configuration(
                    Bucket=self.bucket, LifecycleConfiguration={"Rules": kept + [mine]})
                log.info("%s: objects expire after %d day(s) (lifecycle rule %s)", self.where,
                         self.expire_days, self.rule_id)
            elif not any(covers(r, self.prefix) for r in rules):
                log.warning("%s: no enabled lifecycle rule expires this prefix, so images are kept "
                            "forever; set LATENTD_S3_EXPIRE_DAYS or add a rule", self.where)
        except self._errors as e:
            log.error("%s", self._fail("lifecycle setup", e))


def covers(rule: dict, prefix: str) -> bool:
    """An enabled expiration rule whose prefix filter contains `prefix`."""
    if rule.get("Status") != "Enabled" or "Expiration" not in rule:
        return False
    f = rule.get("Filter") or {}
    p = f.get("Prefix", (f.get("And") or {}).get("Prefix", rule.get("Prefix", "")))
    return prefix.startswith(p or "")
