#!/bin/sh
# Entry point of the koin image: `gunicorn …` runs the web tier, anything else is a koin
# subcommand (`worker --no-beat`, `scheduler`, `tsa serve --host 0.0.0.0`, `db upgrade`, …).
set -eu
case "${1:-}" in
    gunicorn) exec "$@" ;;
    koin) shift; exec koin "$@" ;;
    *) exec koin "$@" ;;
esac
