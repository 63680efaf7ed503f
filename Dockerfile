# koin (公印): one image for every part of the many-machine layout in compose.yaml — the web
# tier (gunicorn), Celery workers, the scheduler, the TSA and the one-shot init/migrate.
#
# No key, passphrase or secret is in the image: keys and KOIN_HOME live on volumes, and
# KOIN_KEY_PASSPHRASE, KOIN_SECRET_KEY and the database password come from the environment
# when a container starts (.dockerignore keeps instance folders, *.p12 and *.key out of the
# build context).
#
#   docker build -t koin .
#   docker run --rm koin --help                  # any koin subcommand
#   docker run ... koin gunicorn --config python:web.gunicorn_config   # the web tier
FROM python:3.11-slim-bookworm

# fonts-noto-cjk: the Japanese face of the seal stamp and certificate page (koin init extracts
# it into KOIN_HOME/assets); poppler-utils: pdftoppm draws the page images a party reviews
# before consenting and the stamp template previews; tini: PID 1 that forwards signals and
# reaps the children of gunicorn and Celery.
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        fonts-noto-cjk poppler-utils tini \
    && rm -rf /var/lib/apt/lists/*

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# The source stays in /opt/koin (installed in place): the Alembic migrations that `koin db
# upgrade` runs are found beside the packages. Root owns it; the service user only reads it.
WORKDIR /opt/koin
COPY pyproject.toml README.md ./
# the Python packages only (keys/ is the PKI library, not key material)
COPY keys ./keys
COPY timestamp ./timestamp
COPY signer ./signer
COPY contracts ./contracts
COPY web ./web
COPY migrations ./migrations
COPY deploy/docker-entrypoint.sh /usr/local/bin/koin-entrypoint
RUN pip install --editable . \
    && chmod 0755 /usr/local/bin/koin-entrypoint \
    && python -m compileall -q contracts signer timestamp web keys migrations

# The service user, and KOIN_HOME with its key folder (mode 0700) as mount points: a new
# named volume takes over their owner and mode.
RUN groupadd --system --gid 10001 koin \
    && useradd --system --uid 10001 --gid koin --home-dir /var/lib/koin \
        --no-create-home --shell /usr/sbin/nologin koin \
    && mkdir -p /var/lib/koin/keys \
    && chown -R koin:koin /var/lib/koin \
    && chmod 0700 /var/lib/koin /var/lib/koin/keys

ENV KOIN_HOME=/var/lib/koin \
    KOIN_BIND_HOST=0.0.0.0 \
    KOIN_WEB_PORT=8000
VOLUME ["/var/lib/koin"]
USER koin:koin
WORKDIR /var/lib/koin
EXPOSE 8000 3161
ENTRYPOINT ["tini", "--", "koin-entrypoint"]
CMD ["--help"]
