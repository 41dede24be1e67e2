"""Pick the store of an output location: a local folder for a path, an object-store prefix for a URL.

A URL is checked before anything else happens, so a bad one is refused with one line naming it and the fix:
an unknown scheme, a scheme whose fsspec package is not installed, a scheme cxrgen cannot commit to safely,
credentials written into the URL (they would end up in run.json and logs).
"""
from __future__ import annotations

from pathlib import Path
from urllib.parse import urlsplit

from cxrgen.config import is_url
from cxrgen.errors import InputError
from cxrgen.storage.base import Store
from cxrgen.storage.local import LocalStore

# scheme -> (the fsspec package that implements it, the pip command that installs it)
OBJECT_SCHEMES = {"s3": ("s3fs", 'pip install "cxrgen[s3]"'), "s3a": ("s3fs", 'pip install "cxrgen[s3]"')}
# Schemes fsspec knows but cxrgen does not write to yet: their conditional create (If-None-Match: * or a
# generation precondition) goes through other code in gcsfs / adlfs that no cxrgen test checks.
NOT_YET = {"gs": "gcsfs", "gcs": "gcsfs", "az": "adlfs", "abfs": "adlfs", "abfss": "adlfs"}


def open_store(location: Store | Path | str) -> Store:
    """The store of a run location: a Store as is, a URL's object store, or a local folder (the path as given)."""
    if isinstance(location, Store):
        return location
    text = str(location)
    if not is_url(text):
        return LocalStore(Path(text).expanduser())
    scheme, bucket, prefix = parse_url(text)
    from cxrgen.storage.objects import ObjectStore

    return ObjectStore(f"{scheme}://{bucket}" + (f"/{prefix}" if prefix else ""), scheme, bucket, prefix)


def parse_url(url: str) -> tuple[str, str, str]:
    """(scheme, bucket, prefix) of an object-store URL, refused with one line when cxrgen cannot use it."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if "@" in parts.netloc:
        # never echo the URL itself: the part before "@" is a secret
        raise InputError(f"the {scheme}:// URL holds credentials (user:secret@); remove them from the URL and give "
                         "them the usual way (AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, AWS_PROFILE, or a role)")
    if scheme in NOT_YET:
        raise InputError(f"{url}: cxrgen does not write runs to {scheme}:// yet (its conditional writes are not "
                         "checked by cxrgen's tests); use the store's S3-compatible endpoint with an s3:// URL and "
                         "AWS_ENDPOINT_URL, or a local folder")
    if scheme not in OBJECT_SCHEMES:
        known = ", ".join(f"{s}://" for s in OBJECT_SCHEMES if s != "s3a")
        raise InputError(f"{url}: no storage for the scheme {scheme}://; give a local folder or one of {known} "
                         "(e.g. s3://bucket/prefix)")
    if parts.query or parts.fragment:
        raise InputError(f"{url}: a run URL takes no ?query or #fragment; give s3://bucket/prefix and set options "
                         "(endpoint, profile) in the environment (AWS_ENDPOINT_URL, AWS_PROFILE)")
    package, install = OBJECT_SCHEMES[scheme]
    try:
        __import__(package)
    except ImportError:
        raise InputError(f"{url}: writing to {scheme}:// needs the package {package}; install it with "
                         f"`{install}`") from None
    bucket, prefix = parts.netloc, parts.path.strip("/")
    if not bucket:
        raise InputError(f"{url}: no bucket; write {scheme}://BUCKET/PREFIX")
    if any(p in (".", "..") for p in prefix.split("/")) or "//" in prefix:
        raise InputError(f"{url}: the prefix may not hold empty, '.' or '..' parts; write {scheme}://BUCKET/a/b")
    return "s3" if scheme == "s3a" else scheme, bucket, prefix
