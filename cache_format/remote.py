"""Caches on object storage (s3://, gs://, ...): which package a URL needs, what never goes into a URL,
and which failures are access problems rather than damage.

Endpoint, credentials and region are never options of this code: s3fs hands them to botocore, which
reads the standard AWS sources (AWS_ENDPOINT_URL / AWS_ENDPOINT_URL_S3, AWS_ACCESS_KEY_ID /
AWS_SECRET_ACCESS_KEY / AWS_SESSION_TOKEN, AWS_PROFILE, AWS_DEFAULT_REGION / AWS_REGION, ~/.aws/config
and ~/.aws/credentials, instance roles); gcsfs uses Google's application-default credentials. So no
secret ever passes through the cache's attributes, the logs or config.yaml (docs/OBJECT_STORAGE.md).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any
from urllib.parse import urlparse

from cache_format.errors import CacheError, StoreAccessError

# scheme -> (fsspec filesystem package, this project's pip extra that installs it)
FILESYSTEM_PACKAGES = {
    "s3": ("s3fs", "s3"),
    "s3a": ("s3fs", "s3"),
    "gs": ("gcsfs", "gcs"),
    "gcs": ("gcsfs", "gcs"),
}
REMOTE_THREADS = 16  # verify/repack threads when a store is remote (they wait on the network)
S3_CONNECTIONS = 32  # pooled HTTP connections per S3 filesystem handle (one per process)
_ENDPOINT_HELP = {
    "s3": "check AWS_ENDPOINT_URL (MinIO/Ceph: http://host:port; unset for AWS) and the network",
    "gs": "check the network and the GCS endpoint (STORAGE_EMULATOR_HOST for an emulator)",
}
_CREDENTIALS_HELP = {
    "s3": "check the credentials botocore finds (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / "
    "AWS_SESSION_TOKEN, AWS_PROFILE, ~/.aws/credentials) and that they may read/write this bucket",
    "gs": "check Google application-default credentials (GOOGLE_APPLICATION_CREDENTIALS, "
    "`gcloud auth application-default login`) and the bucket's permissions",
}


def scheme(url: str) -> str:
    """The URL's scheme ('' for a plain path)."""
    url = str(url)
    return urlparse(url).scheme.lower() if "://" in url else ""


def is_remote(url: str) -> bool:
    """True for URLs that are not the local filesystem (s3://, gs://, memory://, ...)."""
    return scheme(url) not in ("", "file", "local")


def _family(url: str) -> str:
    s = scheme(url)
    return "gs" if s in ("gs", "gcs") else "s3" if s in ("s3", "s3a") else s


def redact(url: str) -> str:
    """The URL with any user:password@ part replaced, for messages."""
    url = str(url)
    parsed = urlparse(url) if "://" in url else None
    if parsed is None or "@" not in parsed.netloc:
        return url
    return url.replace(parsed.netloc, "***@" + parsed.netloc.rsplit("@", 1)[1], 1)


def check_url(url: str) -> None:
    """Refuse credentials inside a cache URL: the URL is printed in logs and error messages."""
    if "://" in str(url) and "@" in urlparse(str(url)).netloc:
        raise CacheError(
            f"the cache URL {redact(url)} carries credentials (user:secret@); URLs are printed in "
            "logs, so credentials never go there",
            "remove them from the URL and set them in the environment (AWS_ACCESS_KEY_ID / "
            "AWS_SECRET_ACCESS_KEY or AWS_PROFILE; docs/OBJECT_STORAGE.md)",
        )


def missing_package_error(url: str, exc: BaseException) -> CacheError:
    """The error for a URL whose fsspec filesystem package is not installed."""
    s = scheme(url)
    package, extra = FILESYSTEM_PACKAGES.get(s, (None, None))
    if package is None:
        return CacheError(
            f"cannot open cache URL {redact(url)}: {exc}",
            "install the fsspec filesystem package for this scheme, or use a local path",
        )
    return CacheError(
        f"{s}:// caches need the {package} package, which is not installed",
        f"pip install -e '.[{extra}]' (or: pip install {package})",
    )


def default_workers(*urls: str) -> int | None:
    """Threads for verify/repack: None (dask's default, one per core) on local disk; 16 when a store is
    remote, where each thread mostly waits on requests."""
    return REMOTE_THREADS if any(is_remote(u) for u in urls) else None


def storage_options(url: str) -> dict[str, Any]:
    """fsspec options for a remote URL: never credentials, only behaviour.

    Directory listings are not cached: the format never trusts a listing (a sample exists iff its record
    says committed), and a cached listing in a long-lived reader would go stale as other processes write.
    S3 clients get 32 pooled connections instead of botocore's 10: a reader keeps up to 8 samples of
    ~15-20 range requests each in flight (CacheReader.prefetch), and at 100 ms per request the pool of
    10 measured 1.7x slower (docs/OBJECT_STORAGE.md).
    """
    family = _family(url)
    if family == "s3":
        return {"use_listings_cache": False, "config_kwargs": {"max_pool_connections": S3_CONNECTIONS}}
    if family == "gs":
        return {"use_listings_cache": False}
    return {}


def access_error(exc: BaseException, url: str) -> StoreAccessError | None:
    """A StoreAccessError when `exc` means the store cannot be reached or refuses us, else None.

    Classified by type (PermissionError, connection and timeout errors) and, for botocore's and
    aiohttp's own exception types, by class name, so cache_format needs neither package.
    """
    if isinstance(exc, StoreAccessError):
        return exc
    if not is_remote(url):  # a local disk's errors (full, read-only, permissions) are environment errors
        return None
    names = {cls.__name__ for cls in type(exc).__mro__}
    family = _family(url)
    where = redact(url)
    detail = f"{type(exc).__name__}: {exc}"
    if isinstance(exc, PermissionError) or names & {
        "NoCredentialsError",
        "PartialCredentialsError",
        "CredentialRetrievalError",
        "RefreshWithMFAUnsupportedError",
    }:
        return StoreAccessError(
            f"access to {where} was refused ({detail})",
            _CREDENTIALS_HELP.get(family, "check the credentials for this store"),
        )
    if isinstance(exc, (ConnectionError, TimeoutError)) or names & {
        "BotoCoreError",
        "ClientConnectorError",
        "ServerDisconnectedError",
        "ClientOSError",
    }:
        return StoreAccessError(
            f"cannot reach the store holding {where} ({detail})",
            _ENDPOINT_HELP.get(family, "check the endpoint and the network"),
        )
    return None


@contextmanager
def translated_errors(url: str, doing: str) -> Iterator[None]:
    """Turn a store's access failures inside the block into one clear CacheError (not a traceback).

    `doing` names the operation for the message ("creating the cache at", "opening").
    """
    try:
        yield
    except CacheError:
        raise
    except Exception as exc:
        err: CacheError | None = access_error(exc, url)
        if err is None and is_remote(url) and isinstance(exc, FileNotFoundError):
            err = StoreAccessError(
                f"{doing} {redact(url)} failed: {exc}",
                "check the bucket name, or create the bucket first (e.g. `aws s3 mb "
                "s3://BUCKET`, or your MinIO/Ceph console)",
            )
        if err is None:
            raise
        raise err from exc
