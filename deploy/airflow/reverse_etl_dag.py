"""reverse-etl on Airflow: one task per sync of profiles/profiles.yml, contacts before orders.

Each task runs ``reverse-etl --project-dir $REVERSE_ETL_PROJECT_DIR run SYNC`` in a subprocess
and turns its exit code into the task's outcome, which a BashOperator cannot (it fails every
non-zero code alike, so every failure is retried):

* 0 every row landed: success.
* 1 the run finished with row problems past the sync's thresholds: the task fails **without
  retry** (a retry reads on from the watermark and would pass, hiding them); the alert names
  the error file in the log.
* 2 a usage error: the command line below is wrong; fails without retry.
* 3 the run could not run or finish (config, warehouse, lock held, API gave up): retried,
  since unacknowledged rows stay behind the watermark and a retry sends them.
* 130/143 stopped by a signal: what was acknowledged is committed; retried.

reverse-etl lives in its own virtualenv (``scripts/image-install.sh``), not in Airflow's: the
two pin different libraries. Secrets (KLAVIYO_API_KEY, DOTDIGITAL_API_USER, ...) and
REVERSE_ETL_STATE_URL come from the worker's environment. Several workers share the state
store, so it must be PostgreSQL (deploy/README.md). Airflow's schedule replaces the syncs'
``schedule:`` keys, which only ``run --due`` and ``scheduler`` read.
"""

from __future__ import annotations

import logging
import os
import subprocess
from datetime import datetime, timedelta
from typing import Any

# Airflow 3 names first, then where Airflow 2 (and early 3.x releases) keep them
try:
    from airflow.sdk import DAG
except ImportError:
    from airflow import DAG
try:
    from airflow.providers.standard.operators.python import PythonOperator
except ImportError:
    from airflow.operators.python import PythonOperator
try:
    from airflow.sdk.exceptions import AirflowException, AirflowFailException
except ImportError:
    from airflow.exceptions import AirflowException, AirflowFailException

REVERSE_ETL = os.environ.get("REVERSE_ETL_BIN", "/opt/reverse-etl/bin/reverse-etl")
PROJECT_DIR = os.environ.get("REVERSE_ETL_PROJECT_DIR", "/opt/reverse-etl-project")
# Seconds the run gets, once the task is killed, to commit the batches in flight (the CLI's
# REVERSE_ETL_STOP_GRACE_SECONDS, default 20), plus a margin.
STOP_GRACE = 30

# The syncs of profiles/profiles.yml, and which must land first: an order needs its profile
# (Klaviyo attaches events to it) or contact (Dotdigital refuses an order without one).
SYNCS = [
    "klaviyo_profiles",
    "klaviyo_orders",
    "klaviyo_catalog",
    "dotdigital_contacts",
    "dotdigital_orders",
    "dotdigital_catalog",
]
DEPENDS_ON = {
    "klaviyo_orders": "klaviyo_profiles",
    "dotdigital_orders": "dotdigital_contacts",
}

# reverse_etl/errors.py: the CLI's exit codes
EXIT_OK = 0
EXIT_ROW_ERRORS = 1
EXIT_USAGE = 2
EXIT_FAILED = 3
EXIT_SIGNALS = (130, 143)

log = logging.getLogger(__name__)


def outcome(sync: str, code: int) -> Exception | None:
    """The exception that gives the task the outcome exit ``code`` calls for, or None."""
    if code == EXIT_OK:
        return None
    if code == EXIT_ROW_ERRORS:
        return AirflowFailException(
            f"{sync}: row problems past the sync's thresholds (exit 1): see the error file "
            "named in the log; not retried, a retry would read past those rows"
        )
    if code == EXIT_USAGE:
        return AirflowFailException(f"{sync}: reverse-etl usage error (exit 2): fix the DAG")
    if code == EXIT_FAILED:
        return AirflowException(
            f"{sync}: could not run or finish (exit 3): config, warehouse, lock or API; "
            "unacknowledged rows stay behind the watermark and a retry sends them"
        )
    if code in EXIT_SIGNALS:
        return AirflowException(f"{sync}: stopped by a signal (exit {code}); retried")
    return AirflowException(f"{sync}: reverse-etl exited {code} (unexpected); retried")


def run_sync(sync: str) -> None:
    """Run one sync; its output goes to the task log as it comes."""
    command = [REVERSE_ETL, "--project-dir", PROJECT_DIR, "run", sync]
    process = subprocess.Popen(command)
    try:
        code = process.wait()
    except BaseException:  # the task was killed or timed out: let the run commit, then stop
        process.terminate()
        try:
            process.wait(STOP_GRACE)
        except subprocess.TimeoutExpired:
            process.kill()
        raise
    error = outcome(sync, code)
    if error is not None:
        raise error


def alert(context: dict[str, Any]) -> None:
    """Called once a task has failed for good: send it where your team looks (Slack, PagerDuty,
    e-mail). The exception's message says which exit code and what to do."""
    task = context["task_instance"]
    log.error("reverse-etl alert: %s failed: %s", task.task_id, context.get("exception"))


with DAG(
    dag_id="reverse_etl",
    description="Warehouse views to Klaviyo and Dotdigital (reverse-etl run SYNC)",
    schedule="@hourly",
    start_date=datetime(2026, 1, 1),
    catchup=False,
    max_active_runs=1,  # one run per sync at a time; reverse-etl's lock would refuse a second
    dagrun_timeout=timedelta(hours=6),
    default_args={
        "retries": 2,
        "retry_delay": timedelta(minutes=10),
        "execution_timeout": timedelta(hours=4),
        "on_failure_callback": alert,
    },
    tags=["reverse-etl"],
) as dag:
    tasks = {
        sync: PythonOperator(task_id=sync, python_callable=run_sync, op_kwargs={"sync": sync})
        for sync in SYNCS
    }
    for downstream, upstream in DEPENDS_ON.items():
        tasks[upstream] >> tasks[downstream]
