"""CSV debug mode: export → validate reports what validating the live view reports, the CSV
error file names CSV lines, and both work against s3:// (moto on 127.0.0.1), as does a run's
error file in an s3:// error_dir."""

from __future__ import annotations

import csv
import io
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import boto3
import pytest

from reverse_etl.config import Project, load_project
from reverse_etl.csv_debug import export_csv, validate
from reverse_etl.engine import RunOptions, run_sync
from reverse_etl.errors import EXIT_FAILED, EXIT_ROW_ERRORS, SchemaMismatchError
from reverse_etl.state import StateStore
from tests.helpers import (
    PEOPLE_COLUMNS,
    FakeDestination,
    create_table,
    free_port,
    people_db,
    person,
    project_data,
    read_csv_rows,
    sync_entry,
    write_project,
)

BUCKET = "retl-test"


def dirty_rows() -> list[tuple]:
    rows = [person(i) for i in range(30)]
    rows[2] = person(2, email="not-an-email")
    rows[3] = person(3, email="  MiXed@Example.COM ")
    rows[5] = person(5, consent="maybe")
    rows[6] = person(6, phone="12345")
    rows[7] = person(7, phone="(415) 555-2671")  # fine with default_phone_region US
    rows[8] = person(8, email="")  # missing identifier
    rows[9] = person(9, modified_at=None)  # missing cursor
    rows[11] = person(11, email="mixed@example.com")  # later duplicate of row 3's address
    rows[12] = person(12, email='=HYPERLINK("x")')  # invalid and formula-like
    rows[14] = person(14, consent="2", phone="+1 555")  # two problems in one row
    rows[20] = person(20, email="用户@例子.广告")  # rescued by the slow path
    return rows


def unneutralised(cell: str) -> str:
    """The text before the error file's formula neutralisation (a leading quote)."""
    return cell[1:] if cell[:1] == "'" and cell[1:2] in ("=", "+", "-", "@", "\t", "\r") else cell


def problems(path: str | Path) -> Counter[tuple[str, str, str]]:
    return Counter((e["identifier"], e["column"], e["reason"]) for e in read_csv_rows(path))


@pytest.fixture()
def project(tmp_path: Path) -> Project:
    people_db(tmp_path, dirty_rows())
    write_project(tmp_path, project_data(syncs=[sync_entry(batch_size=7)]))
    return load_project(None, tmp_path, env={})


def test_export_writes_the_view_as_the_warehouse_returns_it(
    project: Project, tmp_path: Path
) -> None:
    target = tmp_path / "out" / "people.csv"
    n = export_csv(project, project.sync("people"), str(target))
    assert n == 30
    with open(target, newline="", encoding="utf-8") as fh:
        rows = list(csv.reader(fh))
    assert rows[0] == list(PEOPLE_COLUMNS)
    assert len(rows) == 31
    by_email = {r[0]: r for r in rows[1:]}
    assert by_email["  MiXed@Example.COM "][3] == "yes"  # untouched: no trimming on export
    assert by_email["person00000@example.com"][4] == "2025-03-01T12:00:00+00:00"
    assert by_email["person00009@example.com"][4] == ""  # NULL cursor
    assert by_email['=HYPERLINK("x")'][0] == '=HYPERLINK("x")'  # data, not an error file


def test_export_of_an_empty_view_writes_the_header(tmp_path: Path) -> None:
    people_db(tmp_path, [])
    write_project(tmp_path)
    project = load_project(None, tmp_path, env={})
    target = tmp_path / "empty.csv"
    assert export_csv(project, project.sync("people"), str(target)) == 0
    assert target.read_text().strip() == ",".join(PEOPLE_COLUMNS)


def test_export_then_validate_reports_the_same_problems_as_the_live_view(
    project: Project, tmp_path: Path
) -> None:
    sync = project.sync("people")
    live = validate(project, sync, csv_path=None, error_file=str(tmp_path / "live.csv"))
    export_csv(project, sync, str(tmp_path / "people.csv"))
    from_csv = validate(
        project, sync, csv_path=str(tmp_path / "people.csv"), error_file=str(tmp_path / "csv.csv")
    )
    assert live.rows == from_csv.rows == 30
    assert live.bad_rows == from_csv.bad_rows
    assert live.by_reason == from_csv.by_reason
    assert live.by_reason == {
        "invalid_email": 2,
        "invalid_consent": 2,
        "invalid_phone": 2,
        "missing_identifier": 1,
        "missing_cursor": 1,
        "duplicate_identifier": 1,
    }
    assert live.bad_rows == 8
    assert problems(live.error_file) == problems(from_csv.error_file)
    # the older spelling of a duplicated address is the one rejected, named as stored
    assert ("  MiXed@Example.COM ", "email", "duplicate_identifier") in problems(live.error_file)
    # validation moves no state and writes no run
    assert not (tmp_path / "state").exists()


def test_csv_error_file_names_csv_line_numbers(project: Project, tmp_path: Path) -> None:
    sync = project.sync("people")
    export = tmp_path / "people.csv"
    export_csv(project, sync, str(export))
    report = validate(project, sync, csv_path=str(export), error_file=str(tmp_path / "e.csv"))
    with open(export, newline="", encoding="utf-8") as fh:
        lines = list(csv.reader(fh))  # lines[0] is the header = line 1
    errors = read_csv_rows(report.error_file)
    assert errors
    for e in errors:
        line = lines[int(e["row_number"]) - 1]
        record = dict(zip(lines[0], line, strict=True))
        assert record["email"] == unneutralised(e["identifier"]), e
        if e["column"] in record and e["reason"] not in {"missing_identifier", "missing_cursor"}:
            assert record[e["column"]] == unneutralised(e["value"]), e


def test_live_error_file_names_read_positions(project: Project, tmp_path: Path) -> None:
    sync = project.sync("people")
    report = validate(project, sync, csv_path=None, error_file=str(tmp_path / "e.csv"))
    rows = {e["reason"]: int(e["row_number"]) for e in read_csv_rows(report.error_file)}
    # the read is in (cursor, id) order with NULL cursors first
    assert rows["missing_cursor"] == 1


def test_round_trip_keeps_checks_inferred_from_column_types(tmp_path: Path) -> None:
    columns = dict(PEOPLE_COLUMNS, last_order_at="TIMESTAMPTZ")
    rows = [person(i) + (datetime(1980 if i == 1 else 2024, 1, 1, tzinfo=UTC),) for i in range(4)]
    create_table(tmp_path / "warehouse.duckdb", "people", columns, rows)
    mapping = {"email": "email", "last_order_at": "properties.Last_Order_At"}
    write_project(tmp_path, project_data(syncs=[sync_entry(mapping=mapping)]))
    project = load_project(None, tmp_path, env={})
    sync = project.sync("people")
    live = validate(project, sync, csv_path=None, error_file=str(tmp_path / "live.csv"))
    assert live.by_reason == {"timestamp_too_old": 1}
    export_csv(project, sync, str(tmp_path / "x.csv"))
    from_csv = validate(
        project, sync, csv_path=str(tmp_path / "x.csv"), error_file=str(tmp_path / "c.csv")
    )
    assert from_csv.by_reason == live.by_reason


def test_validate_csv_missing_a_mapped_column(project: Project, tmp_path: Path) -> None:
    bad = tmp_path / "bad.csv"
    bad.write_text("email,modified_at\na@example.com,2025-01-01T00:00:00Z\n")
    with pytest.raises(SchemaMismatchError) as info:
        validate(
            project, project.sync("people"), csv_path=str(bad), error_file=str(tmp_path / "e.csv")
        )
    assert "column 'first_name' is not in the view" in str(info.value)
    assert str(bad) in str(info.value)


def test_validate_a_hand_written_csv(project: Project, tmp_path: Path) -> None:
    hand = tmp_path / "hand.csv"
    hand.write_text(
        "email,first_name,phone,email_consent,modified_at\r\n"
        "ok@example.com,Ann,+14155552671,yes,2025-01-01 10:00:00\r\n"
        "bad-address,Bob,,no,2025-01-01T10:00:00Z\r\n"
        "c@example.com,Cy,,,not a time\r\n"
    )
    report = validate(
        project, project.sync("people"), csv_path=str(hand), error_file=str(tmp_path / "e.csv")
    )
    assert report.rows == 3
    found = {(e["row_number"], e["reason"]) for e in read_csv_rows(report.error_file)}
    assert found == {("3", "invalid_email"), ("4", "invalid_cursor")}
    bad_cursor = [e for e in read_csv_rows(report.error_file) if e["reason"] == "invalid_cursor"]
    assert (bad_cursor[0]["column"], bad_cursor[0]["value"]) == ("modified_at", "not a time")


def test_lines_with_too_many_or_too_few_fields_are_named_and_the_rest_checked(
    project: Project, tmp_path: Path
) -> None:
    """One line with a field too many once made DuckDB read the whole file as one column
    ("column 'first_name' is not in the view"), naming no line. Each such line is now a row
    error with its line number and text, and the other lines are checked, numbered as the
    file numbers them."""
    hand = tmp_path / "ragged.csv"
    hand.write_text(
        "email,first_name,phone,email_consent,modified_at\n"
        "ok@example.com,Ann,+14155552671,yes,2025-01-01T10:00:00Z\n"
        "extra@example.com,Bea,,yes,2025-01-01T10:00:01Z,surplus\n"
        "short@example.com,Cy\n"
        "bad-address,Dee,,no,2025-01-01T10:00:03Z\n"
        "ok2@example.com,Eve,,no,2025-01-01T10:00:04Z\n"
    )
    report = validate(
        project, project.sync("people"), csv_path=str(hand), error_file=str(tmp_path / "e.csv")
    )
    assert (report.rows, report.bad_rows) == (5, 3)
    errors = read_csv_rows(report.error_file)
    assert [(e["row_number"], e["reason"]) for e in errors] == [
        ("3", "malformed_csv_row"),
        ("4", "malformed_csv_row"),
        ("5", "invalid_email"),  # the line after the two set aside keeps its own number
    ]
    assert errors[0]["value"] == "extra@example.com,Bea,,yes,2025-01-01T10:00:01Z,surplus"
    assert "line 3" in errors[0]["message"] and errors[0]["how_to_fix"]
    assert errors[1]["value"] == "short@example.com,Cy"


# --------------------------------------------------------------------------- s3 (moto)


@pytest.fixture(scope="module")
def moto_endpoint() -> Iterator[str]:
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


@pytest.fixture()
def s3(moto_endpoint: str, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    for name in (
        "AWS_PROFILE",
        "AWS_SESSION_TOKEN",
        "AWS_CONFIG_FILE",
        "AWS_SHARED_CREDENTIALS_FILE",
    ):
        monkeypatch.delenv(name, raising=False)
    client = boto3.client("s3", endpoint_url=moto_endpoint, region_name="us-east-1")
    client.create_bucket(Bucket=BUCKET)
    yield client
    for obj in client.list_objects_v2(Bucket=BUCKET).get("Contents", []):
        client.delete_object(Bucket=BUCKET, Key=obj["Key"])
    client.delete_bucket(Bucket=BUCKET)


def s3_text(client, key: str) -> str:
    return client.get_object(Bucket=BUCKET, Key=key)["Body"].read().decode("utf-8-sig")


def s3_problems(client, key: str) -> Counter[tuple[str, str, str]]:
    rows = csv.DictReader(io.StringIO(s3_text(client, key), newline=""))
    return Counter((e["identifier"], e["column"], e["reason"]) for e in rows)


def keys(client, prefix: str = "") -> list[str]:
    return [
        o["Key"] for o in client.list_objects_v2(Bucket=BUCKET, Prefix=prefix).get("Contents", [])
    ]


def test_export_and_validate_through_s3(s3, project: Project, tmp_path: Path) -> None:
    sync = project.sync("people")
    assert export_csv(project, sync, f"s3://{BUCKET}/exports/people.csv") == 30
    local = tmp_path / "people.csv"
    export_csv(project, sync, str(local))
    body = s3.get_object(Bucket=BUCKET, Key="exports/people.csv")["Body"].read()
    assert body == local.read_bytes()

    report = validate(
        project,
        sync,
        csv_path=f"s3://{BUCKET}/exports/people.csv",
        error_file=f"s3://{BUCKET}/errors/validate.csv",
    )
    live = validate(project, sync, csv_path=None, error_file=str(tmp_path / "live.csv"))
    assert report.error_file == f"s3://{BUCKET}/errors/validate.csv"
    assert report.by_reason == live.by_reason
    assert s3_problems(s3, "errors/validate.csv") == problems(live.error_file)


def test_validate_missing_s3_object_is_an_error(s3, project: Project, tmp_path: Path) -> None:
    with pytest.raises(Exception) as info:
        validate(
            project,
            project.sync("people"),
            csv_path=f"s3://{BUCKET}/nope.csv",
            error_file=str(tmp_path / "e.csv"),
        )
    assert "404" in str(info.value) or "Not Found" in str(info.value)


def s3_project(tmp_path: Path, rows) -> tuple[Project, StateStore]:
    people_db(tmp_path, rows)
    write_project(
        tmp_path, project_data(syncs=[sync_entry(batch_size=10)], error_dir=f"s3://{BUCKET}/errors")
    )
    project = load_project(None, tmp_path, env={})
    return project, StateStore(project.state.url, root=tmp_path)


def test_run_error_file_in_s3_error_dir(s3, tmp_path: Path) -> None:
    project, store = s3_project(tmp_path, dirty_rows())
    fake = FakeDestination()
    try:
        result = run_sync(project, "people", store, destination_factory=lambda p, s: fake)
    finally:
        store.close()
    assert result.exit_code == EXIT_ROW_ERRORS
    rec = result.record
    key = f"errors/people/{rec.run_id}.csv"
    assert rec.error_file == f"s3://{BUCKET}/{key}"
    assert keys(s3, "errors/") == [key]
    assert sum(s3_problems(s3, key).values()) == sum(result.by_reason.values()) == 9
    assert not (tmp_path / "errors").exists()  # nothing written locally


def test_failed_run_still_uploads_its_s3_error_file(s3, tmp_path: Path) -> None:
    project, store = s3_project(tmp_path, dirty_rows())
    fake = FakeDestination(fail_on_batch=3)
    try:
        result = run_sync(
            project, "people", store, RunOptions(), destination_factory=lambda p, s: fake
        )
    finally:
        store.close()
    assert result.exit_code == EXIT_FAILED
    key = f"errors/people/{result.record.run_id}.csv"
    assert result.record.error_file == f"s3://{BUCKET}/{key}"
    assert key in keys(s3, "errors/")
    assert sum(s3_problems(s3, key).values()) >= 1
