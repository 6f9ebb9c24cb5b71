#!/bin/sh
# Install reverse-etl from a built wheel into its own virtualenv, at the versions pinned in
# constraints.txt. The Dockerfile RUNs this script and tests/test_deploy.py runs it against the
# wheel of the tree in a fresh folder, so the image's install steps are the tested ones.
#
# usage: scripts/image-install.sh WHEEL VENV CONSTRAINTS
#   EXTRAS  the extras to install, comma-separated (default: postgres,s3; empty: none)
#   PYTHON  the interpreter the virtualenv is made from (default: python3)
#   BYTECOMPILE  0 to skip byte-compiling (the tests, to save ~10 s; the image compiles)
#
# The virtualenv gets no pip of its own (smaller image, nothing to patch): the base
# interpreter's pip installs into it (pip >= 22.3, `pip --python`), byte-compiling as it goes,
# so a non-root user on a read-only filesystem never has to. PIP_* variables pass through
# (the Dockerfile sets PIP_NO_CACHE_DIR=1).
set -eu

if [ "$#" -ne 3 ]; then
    echo "usage: $0 WHEEL VENV CONSTRAINTS" >&2
    exit 2
fi
wheel=$1
venv=$2
constraints=$3
extras=${EXTRAS-postgres,s3}
python=${PYTHON:-python3}
compile=--compile
if [ "${BYTECOMPILE:-1}" = 0 ]; then
    compile=--no-compile
fi

for file in "$wheel" "$constraints"; do
    if [ ! -f "$file" ]; then
        echo "$0: $file: no such file (build the wheel first: pip wheel --no-deps -w dist .)" >&2
        exit 2
    fi
done

"$python" -m venv --without-pip "$venv"
requirement=$wheel
if [ -n "$extras" ]; then
    requirement="${wheel}[${extras}]"
fi
PIP_DISABLE_PIP_VERSION_CHECK=1 "$python" -m pip --python "$venv/bin/python" install \
    --quiet "$compile" --constraint "$constraints" "$requirement"

# Smoke check: the entry point runs and every extra asked for imports.
"$venv/bin/reverse-etl" --version
"$venv/bin/python" - "$extras" <<'EOF'
import importlib
import sys

MODULES = {
    "postgres": ["psycopg", "adbc_driver_postgresql"],
    "snowflake": ["snowflake.connector"],
    "bigquery": ["google.cloud.bigquery"],
    "s3": ["boto3"],
    "sandbox": ["starlette", "uvicorn", "openapi_core"],
}
for extra in filter(None, sys.argv[1].split(",")):
    for module in MODULES.get(extra.strip(), []):
        importlib.import_module(module)
EOF
