"""Klaviyo as the real API behaves: import jobs that take hours (polls back off to minutes and
end at a deadline, the rows left unacknowledged), import errors tied to rows whatever shape
their pointer has (consent never sent for a profile that failed), and phone numbers checked
against numbering plans (one bad number never refuses a whole call)."""

from __future__ import annotations

from typing import Any

import httpx
import pyarrow as pa
import pytest

from reverse_etl.destinations import jobs as shared_jobs
from reverse_etl.destinations.klaviyo import jobs, phones
from reverse_etl.destinations.klaviyo.import_errors import JobProfiles, Location, locate
from reverse_etl.destinations.klaviyo.profiles import KlaviyoProfiles
from reverse_etl.errors import EXIT_FAILED, EXIT_ROW_ERRORS, ConfigError
from tests.helpers import at
from tests.sandboxes import Rig, assert_counts, error_rows
from tests.test_klaviyo_consent import consent_sync, people, person, subscriptions

# --------------------------------------------------------------------------- slow jobs


class _Clock:
    """Vendor time that moves only when the code under test sleeps."""

    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


class _Client:
    """Answers job polls: processing until ``done_at`` (clock seconds), then complete."""

    def __init__(self, clock: _Clock, done_at: float = float("inf")):
        self.clock, self.done_at, self.polls = clock, done_at, 0

    def json(self, op: str, method: str, path: str, **_: Any) -> dict[str, Any]:
        self.polls += 1
        status = "complete" if self.clock.now >= self.done_at else "processing"
        return {"data": {"id": path.rsplit("/", 1)[1], "attributes": {"status": status}}}


def _job() -> jobs.Job:
    kind = jobs.JobKind("/api/profile-bulk-import-jobs", "submit", "poll", "profile import job")
    return jobs.Job(kind, b"{}", 10_000, id="J1", attempts=1)


def test_polls_back_off_to_minutes_and_stop_at_the_deadline():
    clock = _Clock()
    client = _Client(clock)
    waiting = jobs.patience(0.2, 120, clock=clock, sleep=clock.sleep)

    with pytest.raises(shared_jobs.JobTimeout) as late:
        jobs.wait(client, _job(), attempts=3, poll_interval=0.2, waiting=waiting)  # type: ignore[arg-type]

    assert clock.now == pytest.approx(7200)  # the last poll is at the deadline, not after
    assert clock.sleeps[0] == pytest.approx(0.2)
    assert max(clock.sleeps) == pytest.approx(jobs.POLL_CEILING)  # minutes between polls at the end
    waited = 0.0
    for pause in clock.sleeps:  # never longer than a tenth of the time waited so far
        assert pause <= max(0.2, jobs.POLL_SHARE * waited) + 1e-9
        waited += pause
    assert client.polls < 150  # two hours for 10,000 profiles cost ~100 polls, not 1,440
    message = str(late.value)
    assert "J1" in message and "'processing'" in message and "job_timeout_minutes" in message
    assert "120 minutes" in message


def test_a_job_done_soon_is_seen_soon():
    clock = _Clock()
    client = _Client(clock, done_at=30.0)
    waiting = jobs.patience(0.2, 120, clock=clock, sleep=clock.sleep)

    doc = jobs.wait(client, _job(), attempts=3, poll_interval=0.2, waiting=waiting)  # type: ignore[arg-type]

    assert doc["data"]["attributes"]["status"] == "complete"
    assert 30.0 <= clock.now <= 33.0 + 0.2  # seen within a tenth of the time it took


def test_the_deadline_covers_resubmissions():
    """A job Klaviyo cancels is submitted again, but the deadline is the whole wait's."""
    clock = _Clock()

    class Cancelling:
        what, id, attempts = "a job", "J", 1

        def start(self) -> None:
            self.attempts += 1

        def status(self) -> tuple[str, dict[str, Any]]:
            cancelled = self.attempts == 1 and clock.now >= 50  # then runs on
            return ("failed" if cancelled else "running"), {"status": "cancelled"}

    patience = shared_jobs.Patience(first=1, ceiling=10, timeout=60, clock=clock, sleep=clock.sleep)
    job = Cancelling()
    with pytest.raises(shared_jobs.JobTimeout):
        shared_jobs.wait(job, attempts=5, poll_interval=1, patience=patience)  # type: ignore[arg-type]
    assert clock.now == pytest.approx(60) and job.attempts == 2


def test_an_import_job_past_its_deadline_leaves_its_rows_unacknowledged(klaviyo):
    # an import that stays processing an hour (limits off: the fast test client retries a
    # 429 within 0.1 s, inside the same fixed one-second window of a sandbox at speedup 1)
    rig = klaviyo(job_seconds=3600.0, speedup=1.0, enforce_limits=False)
    people(rig, [person(n, "yes") for n in range(3)])
    rig.configure([consent_sync(destination={"job_timeout_minutes": 0.005})])  # 0.3 s

    result = rig.run("profiles")

    assert result.exit_code == EXIT_FAILED
    assert "still running" in result.record.message
    assert "job_timeout_minutes" in result.record.message
    assert rig.watermark("profiles") is None  # nothing acknowledged: the next run sends them
    assert rig.requests("POST", "/api/profile-subscription-bulk-create-jobs") == []

    rig.sandbox.jobs.duration = 0.05  # Klaviyo's queue drained
    assert_counts(rig.run("profiles"), 0, read=3, sent=3)
    assert rig.watermark("profiles") is not None


def test_job_timeout_minutes_must_be_a_positive_number(klaviyo):
    rig = klaviyo()
    people(rig, [person(0, "yes")])
    with pytest.raises(ConfigError, match="job_timeout_minutes: a number of minutes above 0"):
        rig.configure([consent_sync(destination={"job_timeout_minutes": 0})])


# --------------------------------------------------------------------------- import errors


@pytest.mark.parametrize(
    ("pointer", "expected"),
    [
        ("/data/attributes/profiles/data/3/attributes/phone_number", Location(3, "phone_number")),
        ("/data/attributes/profiles/data/3", Location(3, None)),
        ("/data/attributes/profiles/data/3/attributes/location/city", Location(3, "location.city")),
        (
            "/data/attributes/profiles/data/0/attributes/properties/a~1b",
            Location(0, "properties.a/b"),
        ),
        ("/3/attributes/email", Location(3, "email")),
        ("/data/7", Location(7, None)),
        ("/data/attributes/phone_number", Location(None, "phone_number")),
        ("/data", Location(None, None)),
        ("", Location(None, None)),
        (None, Location(None, None)),
    ],
)
def test_pointer_shapes(pointer, expected):
    assert locate(pointer) == expected


def _job_rows() -> JobProfiles:
    table = pa.table(
        {
            "__row": [11, 12, 13, 14],
            "__id": ["a@x.com", "b@x.com", "c@x.com", "d@x.com"],
            "email": ["a@x.com", "b@x.com", "c@x.com", "d@x.com"],
            "phone_number": ["+14155550001", "+14155550002", None, "+14155550004"],
        }
    )
    return JobProfiles(table, {"email": "mail", "phone_number": "phone"})


def _error(pointer: str | None, payload: Any = None) -> dict[str, Any]:
    return {
        "code": "invalid",
        "title": "Invalid input.",
        "detail": "Bad.",
        "source": {"pointer": pointer},
        "original_payload": payload,
    }


def test_import_errors_are_tied_to_rows_by_each_pointer_shape():
    found = _job_rows().attribute(
        [
            _error("/data/attributes/profiles/data/1/attributes/phone_number"),
            _error("/data/attributes/profiles/data/3"),
            _error(None, {"email": "C@X.com"}),  # no pointer: by the payload's email
            _error(
                "/data/attributes/phone_number", {"attributes": {"phone_number": "+14155550001"}}
            ),
            _error("/data/attributes/profiles/data/9", {"external_id": "nobody"}),  # past the job
            _error("/data"),
        ]
    )
    got = [(e.row_number, e.identifier, e.column, e.value) for e in found.errors]
    assert got == [
        (12, "b@x.com", "phone", "+14155550002"),  # the warehouse column and its value
        (14, "d@x.com", "(profile)", "null"),
        (13, "c@x.com", "(profile)", '{"email":"C@X.com"}'),
        (11, "a@x.com", "phone", "+14155550001"),
    ]
    assert all(e.reason == "destination_rejected" for e in found.errors)
    assert "Invalid input. Bad." in found.errors[0].message
    assert [e["source"]["pointer"] for e in found.unknown] == [
        "/data/attributes/profiles/data/9",
        "/data",
    ]


def test_consent_is_never_sent_for_a_profile_whose_import_failed(klaviyo):
    rig = klaviyo()
    people(rig, [person(n, "yes", "yes") for n in range(3)] + [person(5, None)])
    rig.configure([consent_sync()])
    rig.run("profiles")
    rig.sandbox.reset_log()

    # person 5 claims person 1's phone number: Klaviyo refuses that profile in the import
    people(
        rig,
        [person(n, "yes", "yes") for n in range(3)]
        + [person(5, "yes", "yes", phone="+14155550001", modified_at=at(50))],
    )
    result = rig.run("profiles")

    assert_counts(result, EXIT_ROW_ERRORS, read=1, sent=1, failed=1)
    [error] = error_rows(result)
    assert (error["identifier"], error["column"]) == ("p5@example.com", "phone")
    assert ("p5@example.com", "email") not in subscriptions(rig)
    assert rig.requests("POST", "/api/profile-subscription-bulk-create-jobs") == []


def test_a_new_email_with_another_profiles_phone_is_refused_not_merged(klaviyo):
    """Two people, one phone number: Klaviyo refuses the second profile ("A profile already
    exists with one of these identifiers") rather than re-keying the first to the new email,
    as the sandbox once did: the first person vanished and the run said success. The refused
    row is a row error naming its phone, and the first profile keeps its email and values."""
    rig = klaviyo()
    people(rig, [person(1, "yes")])
    rig.configure([consent_sync()])
    rig.run("profiles")
    first = rig.sandbox.profile_by_email("p1@example.com")
    assert first is not None

    people(
        rig, [person(1, "yes"), person(7, "yes", phone=first["phone_number"], modified_at=at(70))]
    )
    result = rig.run("profiles")

    assert_counts(result, EXIT_ROW_ERRORS, read=1, sent=1, failed=1)
    [error] = error_rows(result)
    assert error["identifier"] == "p7@example.com"
    assert error["reason"] == "destination_rejected"
    assert "A profile already exists with one of these identifiers" in error["message"]
    assert rig.sandbox.profile_by_email("p1@example.com") is not None  # not re-keyed
    assert rig.sandbox.profile_by_email("p7@example.com") is None
    assert ("p7@example.com", "email") not in subscriptions(rig)


def test_an_import_error_tied_to_no_row_withholds_the_jobs_consent(klaviyo, monkeypatch):
    """Which profile failed is unknown: no consent of the job goes, each row says so."""
    rig = klaviyo()
    people(rig, [person(n, None) for n in range(5)])
    rig.configure([consent_sync()])
    rig.run("profiles")
    fetch = KlaviyoProfiles._import_errors

    def without_pointers(self: KlaviyoProfiles, job_id: str) -> list[dict[str, Any]]:
        errors = fetch(self, job_id)
        return [{**e, "source": {"pointer": None}, "original_payload": None} for e in errors]

    monkeypatch.setattr(KlaviyoProfiles, "_import_errors", without_pointers)
    # person 4 claims person 1's phone number: Klaviyo refuses it, but (here) says not which
    later = {n: at(100 + n) for n in range(5)}
    people(
        rig,
        [*[person(n, "yes", modified_at=later[n]) for n in range(3)]]
        + [person(3, None, modified_at=later[3])]
        + [person(4, "yes", phone="+14155550001", modified_at=later[4])],
    )
    result = rig.run("profiles")

    assert result.exit_code == EXIT_ROW_ERRORS, result.record.message
    counts = result.record.counts  # person 3 is unchanged: not sent
    assert (counts.sent, counts.updated, counts.failed) == (4, 3, 1)  # failed: failed_count
    assert subscriptions(rig) == {}
    errors = error_rows(result)
    withheld = {e["identifier"] for e in errors if e["column"] == "(consent)"}
    assert withheld == {"p0@example.com", "p1@example.com", "p2@example.com", "p4@example.com"}
    assert any(e["column"] == "(import job)" for e in errors)
    assert len(rig.sandbox.profiles()) == 5  # the profiles themselves landed


# --------------------------------------------------------------------------- phones


def test_numbers_outside_their_numbering_plan_are_found_cheaply():
    numbers = pa.chunked_array(
        [["+14155552671", "+19999999999", None, "+447911123456"], ["+4479111234", "+19999999999"]]
    )
    phones.valid.cache_clear()
    assert phones.invalid(numbers).to_pylist() == [False, True, False, False, True, True]
    # the valid numbers fit their plan's expression in Arrow: only the two bad ones were parsed
    assert phones.valid.cache_info().currsize == 2


def test_an_invalid_phone_drops_the_number_and_its_sms_consent_not_the_profile(klaviyo):
    rig = klaviyo(klaviyo_strict_phone_numbers=True)
    people(rig, [person(0, "yes", "yes"), person(1, "yes", "yes", phone="+19999999999")])
    rig.configure([consent_sync()])

    result = rig.run("profiles")

    assert_counts(result, EXIT_ROW_ERRORS, read=2, sent=2, updated=2, failed=0)
    [error] = error_rows(result)
    assert (error["identifier"], error["column"], error["reason"]) == (
        "p1@example.com",
        "phone",
        "phone_not_sent",  # the row was sent: not a transform rejection
    )
    assert "SMS consent was not sent" in error["message"]
    assert rig.sandbox.profile_by_email("p1@example.com").get("phone_number") is None
    subs = subscriptions(rig)
    assert ("p1@example.com", "email") in subs and ("p1@example.com", "sms") not in subs
    assert ("p0@example.com", "sms") in subs


def test_an_invalid_phone_that_is_the_identifier_leaves_the_row_out(klaviyo):
    rig = klaviyo(klaviyo_strict_phone_numbers=True)
    people(rig, [person(0, None), person(1, None, phone="+19999999999")])
    rig.configure([consent_sync(identifier="phone", consent={"sms": "sms_consent"})])

    result = rig.run("profiles")

    assert_counts(result, EXIT_ROW_ERRORS, read=2, sent=1, rejected=1)
    [error] = error_rows(result)
    assert error["reason"] == "invalid_phone" and "only identifier" in error["message"]


def test_the_strict_sandbox_fails_an_imported_invalid_number(klaviyo, monkeypatch):
    """Without the client's check, Klaviyo's numbering-plan check fails the profile in the
    import job; the error names the row and its consent is not sent (no 400 for the call)."""
    monkeypatch.setattr(phones, "invalid", lambda p: pa.array([False] * len(p)))
    rig = klaviyo(klaviyo_strict_phone_numbers=True)
    people(rig, [person(0, "yes", "yes"), person(1, "yes", "yes", phone="+19999999999")])
    rig.configure([consent_sync()])

    result = rig.run("profiles")

    assert_counts(result, EXIT_ROW_ERRORS, read=2, sent=2, updated=1, failed=1)
    [error] = [e for e in error_rows(result) if e["reason"] == "destination_rejected"]
    assert (error["identifier"], error["column"]) == ("p1@example.com", "phone")
    assert "is not a valid phone number" in error["message"]
    assert set(subscriptions(rig)) == {("p0@example.com", "email"), ("p0@example.com", "sms")}


def test_the_strict_sandbox_refuses_a_subscribe_with_an_invalid_number(klaviyo):
    rig: Rig = klaviyo(klaviyo_strict_phone_numbers=True)
    profile = {
        "type": "profile",
        "attributes": {
            "email": "a@example.com",
            "phone_number": "+19999999999",
            "subscriptions": {"sms": {"marketing": {"consent": "SUBSCRIBED"}}},
        },
    }
    body = {
        "data": {
            "type": "profile-subscription-bulk-create-job",
            "attributes": {"profiles": {"data": [profile]}},
        }
    }
    answer = httpx.post(
        f"{rig.base_url}/api/profile-subscription-bulk-create-jobs",
        json=body,
        headers={
            "Authorization": f"Klaviyo-API-Key {rig.sandbox.settings.api_key}",
            "revision": "2026-07-15",
            "Content-Type": "application/vnd.api+json",
            "Accept": "application/vnd.api+json",
        },
    )
    assert answer.status_code == 400
    [violation] = rig.sandbox.violations
    assert violation.pointer == "/data/attributes/profiles/data/0/attributes/phone_number"
    assert "+19999999999 is not a valid phone number." in violation.detail
    rig.sandbox.violations.clear()  # refused on purpose
