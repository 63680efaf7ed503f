"""RFC 3161 time-stamping: our own TSA (in-process and over HTTP) and a verifying client.

Like pyHanko's ``sign/timestamps/``: clients are pyHanko ``TimeStamper`` subclasses
(:class:`TsaClient` for remote TSAs with fallback, :class:`LocalTimeStamper` for the embedded
TSA), the authority is :class:`TimeStampAuthority`, and every failure is a
:class:`TimestampError` — never a fallback to the local clock.
"""

from ._authority import DEFAULT_ACCURACY, DEMO_POLICY_OID, STATE_FILE_NAME, TimeStampAuthority
from ._client import DEFAULT_TIMEOUT, MAX_RESPONSE_BYTES, LocalTimeStamper, TsaClient
from ._server import (
    DEFAULT_MAX_REQUEST_BYTES,
    BackgroundServer,
    make_wsgi_app,
    serve,
    serve_in_background,
)
from .errors import TimestampError

__all__ = [
    "DEFAULT_ACCURACY",
    "DEFAULT_MAX_REQUEST_BYTES",
    "DEFAULT_TIMEOUT",
    "DEMO_POLICY_OID",
    "MAX_RESPONSE_BYTES",
    "STATE_FILE_NAME",
    "BackgroundServer",
    "LocalTimeStamper",
    "TimeStampAuthority",
    "TimestampError",
    "TsaClient",
    "make_wsgi_app",
    "serve",
    "serve_in_background",
]
