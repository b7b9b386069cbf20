"""URL hygiene: what may be shown in a message and what may be stored in an atlas.

Credentials come from the environment (AWS_ACCESS_KEY_ID, ...), never from a URL: `redact` removes a
URL's user:password part and the values of secret query parameters (presigned S3 / GCS URLs, SAS
tokens, ``token=``) so a URL can be printed; `refuse_credentials` refuses a URL that carries either.
Both work on URLs embedded in a longer text, e.g. a data spec such as ``zarr:s3://...``.
"""

from __future__ import annotations

import re

from rfcore.errors import StoreError

#: ``scheme://userinfo@``: userinfo without ``/`` (RFC 3986), or ``user:password`` whose password
#: holds unencoded ``/`` (a common copy-paste of secret keys; the ``:`` tells it from a path).
_USERINFO = re.compile(r"([a-z][a-z0-9+.-]*://)(?:[^/@\s?#]*@|[^/@\s?#:]*:[^@\s?#]*@)", re.IGNORECASE)

#: Query parameters whose values are secrets: presigned URLs (X-Amz-Signature, X-Amz-Credential,
#: X-Amz-Security-Token, X-Goog-Signature, Signature, AWSAccessKeyId), SAS (sig), tokens, keys.
_SECRET_PARAM = re.compile(
    r"([?&;](?:[a-z0-9_.-]*(?:signature|credential|token|secret|password|passwd|apikey|api_key)"
    r"[a-z0-9_.-]*|sig|key|awsaccesskeyid|access_key|accesskey)=)[^&#\s]*",
    re.IGNORECASE,
)

REDACTED = "REDACTED"


def redact(url: str) -> str:
    """`url` (or any text holding URLs) without user:password parts and with secret query values
    replaced by ``REDACTED``: safe for messages and logs."""
    return _SECRET_PARAM.sub(rf"\1{REDACTED}", _USERINFO.sub(r"\1", url))


def has_credentials(url: str) -> bool:
    """Whether `url` embeds a user:password part or a secret query parameter."""
    return bool(_USERINFO.search(url) or _SECRET_PARAM.search(url))


def refuse_credentials(value: str, what: str) -> None:
    """StoreError when `value` embeds credentials (user:password, a presigned signature, a token): a
    URL stored in attrs or named in a run must not carry secrets (they come from the environment)."""
    if has_credentials(value):
        raise StoreError(
            f"{what} {redact(value)!r} embeds credentials; give them in the environment "
            "(AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, ...) instead"
        )


def is_local(url: str) -> bool:
    """A local path (no scheme) or a ``file://`` URL."""
    return "://" not in url or url.startswith("file://")
