#!/usr/bin/env bash
# Create .venv-bqemu/: the BigQuery emulator's own virtualenv (idempotent).
#
# bqemulator 1.4.0 needs sqlglot<30.12 and, offline, duckdb 1.5.5, while the project venv
# pins duckdb 2.0.x (for fakesnow), so the emulator cannot share the project's venv.
# The spatial extension is installed from its PyPI wheel into $HOME/.duckdb/extensions/, so the
# emulator (run with the same HOME) never tries to download it.
set -euo pipefail

cd "$(dirname "$0")/.."
VENV="${BQEMU_VENV:-.venv-bqemu}"
PYTHON="${PYTHON:-python3.11}"
command -v "$PYTHON" >/dev/null 2>&1 || PYTHON=python3

BQEMU_PKGS=(bqemulator==1.4.0 duckdb==1.5.5 duckdb-extension-spatial==1.5.5 numpy)

if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi

if ! "$VENV/bin/python" -c "import importlib.metadata as m; assert m.version('bqemulator') == '1.4.0'; assert m.version('duckdb') == '1.5.5'; import numpy, duckdb_extension_spatial" >/dev/null 2>&1; then
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "${BQEMU_PKGS[@]}"
fi

"$VENV/bin/python" - <<'PY'
import pathlib

import duckdb
import duckdb_extension_spatial as m

con = duckdb.connect()
loaded = con.execute(
    "SELECT installed FROM duckdb_extensions() WHERE extension_name = 'spatial'"
).fetchone()
if not (loaded and loaded[0]):
    ext = (
        pathlib.Path(m.__file__).parent
        / "extensions"
        / f"v{duckdb.__version__}"
        / "spatial.duckdb_extension"
    )
    con.execute(f"INSTALL '{ext}'")
con.execute("LOAD spatial")
print(f"spatial extension ready for duckdb {duckdb.__version__}")
PY

test -x "$VENV/bin/bqemulator"
touch "$VENV/.installed-stamp"  # the Makefile's target for this script
echo "$VENV ready: $VENV/bin/bqemulator"
