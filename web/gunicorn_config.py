"""gunicorn settings of the web tier: ``gunicorn -c python:web.gunicorn_config``.

Read from the environment, so that a container, a systemd unit and ``deploy/run-local.sh``
start it alike (command-line options still override them):

* ``KOIN_BIND_HOST`` / ``KOIN_WEB_PORT``: where to listen (default ``127.0.0.1:8000``);
* ``KOIN_WEB_WORKERS``: worker processes (default: one per CPU);
* ``KOIN_ACCESS_LOG``: the access log, a file or ``-`` for stdout (default), ``off`` for none.

Link tokens in ``/c/…`` and ``/d/…`` paths are replaced in the access and error logs by a
prefix of their SHA-256 (:class:`web.party_views.TokenRedactor`): a log never holds a link.
"""

from __future__ import annotations

import logging
import os

from .party_views import TokenRedactor

wsgi_app = "web.wsgi:app"
bind = [f"{os.environ.get('KOIN_BIND_HOST') or '127.0.0.1'}:"
        f"{os.environ.get('KOIN_WEB_PORT') or '8000'}"]
workers = int(os.environ.get("KOIN_WEB_WORKERS") or os.cpu_count() or 1)
# A party's last consent makes the witness signature (with its timestamp) in the request, and
# a verification may take KOIN_VERIFY_TIME_LIMIT (30 s): give a request more than that.
timeout = 120
graceful_timeout = 30
_access = os.environ.get("KOIN_ACCESS_LOG") or "-"
accesslog = None if _access == "off" else _access
errorlog = "-"
# gunicorn ≥ 25.1 opens a control socket under $HOME by default; a service needs none (and
# its user may have no writable home).
control_socket_disable = True

for _name in ("gunicorn.access", "gunicorn.error"):
    _logger = logging.getLogger(_name)
    if not any(isinstance(existing, TokenRedactor) for existing in _logger.filters):
        _logger.addFilter(TokenRedactor())
