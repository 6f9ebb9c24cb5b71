"""Consent that stays true, against both sandboxes on DuckDB and PostgreSQL sources: a person
who opts out inside the vendor stays opted out through re-sends, lookbacks, ``--full-refresh``
and an older warehouse consent; a newer warehouse consent subscribes them again; what was held
back is a row note (``kept_unsubscribed``) counted as ``consent_held``, not an error; and the
read-back costs a fixed, small number of calls when nothing changed at the vendor.

The person acts inside the vendor through the sandbox (``act_as_person``), as they would on a
preference page; the rig, its request log and the spec checks are test_snapshot_sandboxes'."""

from __future__ import annotations

from typing import Any

import pytest

from reverse_etl.errors import EXIT_OK
from tests.helpers import at
from tests.sandboxes import email_of, profile_row
from tests.test_snapshot_sandboxes import SYNC as SYNC_NAME
from tests.test_snapshot_sandboxes import Rig, Run, consent_written, rig, source  # noqa: F401 - the fixtures

N = 6
READ_BACK = ("/api/profiles", "/v2/contacts/unsubscribed-since/", "/v2/contacts/suppressed-since/")


def people(changes: dict[int, dict[str, Any]] | None = None, *, later: int = 0) -> list[Any]:
    """Rows 0..N-1, every one consenting ("yes") at ``at(3600 + n)`` (``last_order_at``, the
    sync's consent time), with ``changes`` by row number."""
    return [
        profile_row(
            n,
            **{
                "email_consent": "yes",
                "modified_at": at(later + n),
                **(changes or {}).get(n, {}),
            },
        )
        for n in range(N)
    ]


def configure(rig: Rig) -> None:
    rig.configure(consent={"email": {"column": "email_consent", "consented_at": "last_order_at"}})


def status(rig: Rig, email: str) -> str:
    """The person's email marketing standing at the vendor: subscribed or unsubscribed."""
    if rig.kind.name == "klaviyo":
        [held] = [
            s
            for s in rig.sandbox.subscriptions()
            if s["email"] == email and (s["channel"], s["type"]) == ("email", "marketing")
        ]
        return str(held["consent"]).lower()
    contact = rig.held(email)
    assert contact is not None
    return str(contact["channelProperties"]["email"]["status"])


def read_backs(run: Run) -> int:
    return sum(1 for r in run.requests if r.method == "GET" and r.path.startswith(READ_BACK))


def test_an_opt_out_inside_the_vendor_outlives_resends_and_older_consent(rig: Rig) -> None:
    rig.warehouse.load(people())
    configure(rig)
    first = rig.run()
    assert first.code == EXIT_OK, first.result.record.message
    assert all(status(rig, email_of(n)) == "subscribed" for n in range(N))

    # customer 0 unsubscribes on the vendor's preference page, after their warehouse consent
    rig.sandbox.act_as_person(email_of(0), "unsubscribe", at=at(50_000))

    # their next order moves modified_at and a column; a lookback-free full re-send follows
    rig.warehouse.load(people({0: {"first_name": "Ordered"}}, later=100))
    assert rig.run().counts()[1] == 1
    assert rig.run(full_refresh=True, resend=True).counts()[1] == N
    assert status(rig, email_of(0)) == "unsubscribed"

    # the warehouse's consent changes, but is older than the opt-out: held back, a row note
    rig.warehouse.load(
        people({0: {"first_name": "Ordered", "last_order_at": at(40_000)}}, later=200)
    )
    older = rig.run()
    assert older.code == EXIT_OK, older.result.by_reason
    assert older.result.record.counts.consent_held == 1
    assert older.result.by_reason == {"kept_unsubscribed": 1}
    assert consent_written(rig.kind, older) == set()
    assert status(rig, email_of(0)) == "unsubscribed"

    # consent given again after the opt-out (a newer consented_at) is sent
    rig.warehouse.load(
        people({0: {"first_name": "Ordered", "last_order_at": at(60_000)}}, later=300)
    )
    newer = rig.run()
    assert newer.result.record.counts.consent_held == 0
    assert consent_written(rig.kind, newer) == {email_of(0)}
    assert status(rig, email_of(0)) == "subscribed"
    # the others were never touched again
    assert all(status(rig, email_of(n)) == "subscribed" for n in range(1, N))


def test_a_subscribe_without_a_consent_time_never_overrides_an_opt_out(rig: Rig) -> None:
    rig.warehouse.load(people({1: {"email_consent": "no"}}))
    rig.configure()  # no consented_at: the warehouse's consent has no time
    rig.run()
    rig.sandbox.act_as_person(email_of(2), "unsubscribe", at=at(50_000))
    # customer 1 says yes in the warehouse, and so does customer 2's (changed) row
    rig.warehouse.load(people({2: {"first_name": "Changed", "email_consent": "y"}}, later=100))
    run = rig.run()
    assert consent_written(rig.kind, run) == {email_of(1)}
    assert run.result.by_reason == {"kept_unsubscribed": 1}
    assert status(rig, email_of(1)) == "subscribed"
    assert status(rig, email_of(2)) == "unsubscribed"


def test_the_read_back_costs_a_few_calls_when_nothing_changed_at_the_vendor(rig: Rig) -> None:
    rig.warehouse.load(people())
    configure(rig)
    first = rig.run()
    calls = read_backs(first)
    assert 1 <= calls <= 2, [(r.method, r.path) for r in first.requests]
    again = rig.run()  # nothing changed anywhere
    assert read_backs(again) == calls
    assert again.writes == []
    rig.sandbox.act_as_person(email_of(3), "unsubscribe", at=at(50_000))
    after = rig.run()
    assert read_backs(after) == calls  # one page each still


# --------------------------------------------------------------------------- unknown consent


def dotdigital_only(rig: Rig) -> None:
    if rig.kind.name != "dotdigital":
        pytest.skip("unknown_consent is Dotdigital's: it creates a contact sent without consent")


def imported(run: Run, rig: Rig) -> dict[str, dict[str, Any]]:
    return {
        c["identifiers"]["email"]: c
        for r in run.writes
        if r.path == rig.kind.import_path
        for c in rig.kind.records(r.body)
    }


def test_unknown_consent_is_opted_in_as_unknown_and_kept_out_of_the_subscribers_book(
    rig: Rig,
) -> None:
    dotdigital_only(rig)
    rig.warehouse.load(people({0: {"email_consent": None}, 1: {"email_consent": "no"}}))
    rig.configure(
        destination={
            "connection": "dotdigital",
            "list": "Subscribers",
            "unsubscribed_list": "Others",
        }
    )
    first = rig.run()
    assert first.code == EXIT_OK
    docs = imported(first, rig)
    assert docs[email_of(0)]["channelProperties"]["email"] == {"optInType": "unknown"}
    assert docs[email_of(2)]["channelProperties"]["email"]["optInType"] == "single"
    books = {
        name: {c["identifiers"]["email"] for c in rig.sandbox.address_book_members(name)}
        for name in ("Subscribers", "Others")
    }
    assert email_of(0) not in books["Subscribers"] and email_of(0) in books["Others"]
    assert books["Subscribers"] == {email_of(n) for n in range(2, N)}
    # an update of a contact sent before says nothing about its opt-in any more
    rig.warehouse.load(
        people(
            {0: {"email_consent": None, "first_name": "New"}, 1: {"email_consent": "no"}}, later=100
        )
    )
    again = imported(rig.run(), rig)
    assert set(again) == {email_of(0)}
    assert again[email_of(0)].get("channelProperties", {}).get("email", {}) == {}


def test_unknown_consent_skip_creates_no_contact_and_notes_the_row(rig: Rig) -> None:
    dotdigital_only(rig)
    rig.warehouse.load(people({0: {"email_consent": None}}))
    rig.configure(
        destination={"connection": "dotdigital", "list": "Subscribers", "unknown_consent": "skip"}
    )
    run = rig.run()
    assert run.code == EXIT_OK, run.result.by_reason  # a note, not an error
    assert run.result.by_reason == {"unknown_consent_skipped": 1}
    assert run.counts() == (N, N - 1, 0, 1)
    assert rig.held(email_of(0)) is None and rig.held(email_of(1)) is not None


def test_unknown_consent_skip_without_a_consent_column_is_refused(tmp_path: Any) -> None:
    from reverse_etl.config import load_project
    from reverse_etl.errors import ConfigError
    from tests.helpers import write_project

    write_project(
        tmp_path,
        {
            "connections": {
                "wh": {"type": "duckdb", "path": "w.duckdb"},
                "dd": {"type": "dotdigital", "username": "u", "password": "p"},
            },
            "syncs": [
                {
                    "name": "c",
                    "source": {"connection": "wh", "table": "t"},
                    "object": "profiles",
                    "identifier": "email",
                    "destination": {"connection": "dd", "unknown_consent": "skip"},
                    "mapping": {"email": "email"},
                }
            ],
        },
    )
    with pytest.raises(ConfigError, match="unknown_consent: skip needs consent.email"):
        load_project(None, tmp_path, env={})


def test_optouts_exports_what_people_did_at_the_vendor(rig: Rig) -> None:
    import csv

    from click.testing import CliRunner

    from reverse_etl.cli import main

    rig.warehouse.load(people())
    configure(rig)
    rig.run()
    rig.sandbox.act_as_person(email_of(3), "unsubscribe", at=at(50_000))
    rig.sandbox.act_as_person(email_of(4), "complain", at=at(60_000))
    out = rig.root / "optouts.csv"
    args = ["--project-dir", str(rig.root), "optouts", SYNC_NAME, "--csv", str(out)]
    result = CliRunner().invoke(main, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader(out.open()))
    assert [(r["person"], r["channel"], r["status"]) for r in rows] == [
        (email_of(3), "email", "unsubscribed"),
        (email_of(4), "email", "unsubscribed" if rig.kind.name == "klaviyo" else "suppressed"),
    ]
    assert rows[0]["at"].startswith(at(50_000).isoformat()[:19])
    # --since: only what happened after it
    since = at(55_000).strftime("%Y-%m-%dT%H:%M:%S")
    later = CliRunner().invoke(main, [*args[:4], "--since", since], catch_exceptions=False)
    assert later.exit_code == 0, later.output
    assert email_of(4) in later.output and email_of(3) not in later.output


def test_plan_shows_the_consent_a_run_would_write_and_hold_back(rig: Rig) -> None:
    import orjson
    from click.testing import CliRunner

    from reverse_etl.cli import main

    rig.warehouse.load(people({1: {"email_consent": "no"}}))
    configure(rig)
    rig.run()
    rig.sandbox.act_as_person(email_of(0), "unsubscribe", at=at(50_000))
    rig.run()  # reads the opt-out back
    # customer 0's consent moves, but stays older than their opt-out; customer 1 says yes
    rig.warehouse.load(
        people({0: {"last_order_at": at(40_000)}, 1: {"last_order_at": at(45_000)}}, later=100)
    )
    args = ["--project-dir", str(rig.root), "plan", SYNC_NAME, "--json"]
    out = CliRunner().invoke(main, args, catch_exceptions=False)
    assert out.exit_code == 0, out.output
    plan = orjson.loads(out.stdout)
    assert plan["consent"] == {"email subscribe": 1, "email unsubscribe": 0, "held back": 1}
    assert plan["samples"]["consent_held_back"] == [email_of(0)]
    assert status(rig, email_of(0)) == "unsubscribed"  # a plan sends nothing


# --------------------------------------------------------------------------- what "no" means


def test_check_warns_about_an_ambiguous_no_until_no_means_says_what_it_is(rig: Rig) -> None:
    from click.testing import CliRunner

    from reverse_etl.cli import main

    if rig.warehouse.name != "duckdb" or rig.kind.name != "klaviyo":
        pytest.skip("the check's query is the view's, whatever the destination")
    rig.warehouse.load(people({1: {"email_consent": "no"}, 2: {"email_consent": "0"}}))
    rig.configure()
    args = ["--project-dir", str(rig.root), "check"]
    unsure = CliRunner().invoke(main, args, catch_exceptions=False)
    assert unsure.exit_code == 0, unsure.output
    assert "warning" in unsure.output and "0, no" in unsure.output
    assert "no_means" in unsure.output
    rig.configure(consent={"email": {"column": "email_consent", "no_means": "not_subscribed"}})
    sure = CliRunner().invoke(main, args, catch_exceptions=False)
    assert sure.exit_code == 0 and "warning" not in sure.output, sure.output


def test_a_box_never_ticked_leaves_the_vendors_consent_alone(rig: Rig) -> None:
    rig.warehouse.load(people())
    rig.configure(consent={"email": {"column": "email_consent", "no_means": "not_subscribed"}})
    rig.run()
    # the warehouse now says "no" (a box not ticked) for 1 and "unsubscribed" for 2
    rig.warehouse.load(
        people({1: {"email_consent": "no"}, 2: {"email_consent": "unsubscribed"}}, later=100)
    )
    run = rig.run()
    assert consent_written(rig.kind, run) == {email_of(2)}
    assert status(rig, email_of(1)) == "subscribed"
    assert status(rig, email_of(2)) == "unsubscribed"


def test_a_subscribe_inside_the_vendor_outlives_an_older_warehouse_opt_out(rig: Rig) -> None:
    """Both vendors can say who subscribed there and when (Klaviyo for a batch of people, its
    consent time; Dotdigital the contacts modified since the last read, dated by the consent
    record its form keeps): an unsubscribe older than that is held back (``kept_subscribed``);
    a newer one is sent."""
    rig.warehouse.load(people({0: {"email_consent": None}}))
    configure(rig)
    rig.run()
    # customer 0 subscribes through Klaviyo's own form; the warehouse then records an older "no"
    rig.sandbox.act_as_person(email_of(0), "subscribe", at=at(50_000))
    rig.warehouse.load(people({0: {"email_consent": "no", "last_order_at": at(40_000)}}, later=100))
    older = rig.run()
    assert older.code == EXIT_OK, older.result.by_reason
    assert older.result.by_reason == {"kept_subscribed": 1}
    assert older.result.record.counts.consent_held == 1
    assert consent_written(rig.kind, older) == set()
    assert status(rig, email_of(0)) == "subscribed"
    if rig.kind.name == "dotdigital":  # the opt-ins were read, once
        assert [r.path for r in older.requests if r.path == "/contacts/v3"] == ["/contacts/v3"]
    # a newer opt-out in the warehouse is sent
    rig.warehouse.load(people({0: {"email_consent": "no", "last_order_at": at(60_000)}}, later=200))
    newer = rig.run()
    assert consent_written(rig.kind, newer) == {email_of(0)}
    assert status(rig, email_of(0)) == "unsubscribed"
    # our own subscribes are not the person's: a warehouse "no" older than them still goes
    rig.warehouse.load(
        people(
            {
                0: {"email_consent": "no", "last_order_at": at(60_000)},
                1: {"email_consent": "no", "last_order_at": at(1_000)},
            },
            later=300,
        )
    )
    ours = rig.run()
    assert consent_written(rig.kind, ours) == {email_of(1)}


def test_a_withdrawn_consent_as_a_data_field_leaves_the_subscribers_book(rig: Rig) -> None:
    dotdigital_only(rig)
    rig.warehouse.load(people())
    rig.configure(
        destination={
            "connection": "dotdigital",
            "list": "Subscribers",
            "unsubscribed_list": "Others",
            "consent_mode": "data_field",
        }
    )
    rig.run()
    rig.warehouse.load(people({0: {"email_consent": "no"}}, later=100))
    run = rig.run()
    assert run.code == EXIT_OK, run.result.by_reason
    books = {
        name: {c["identifiers"]["email"] for c in rig.sandbox.address_book_members(name)}
        for name in ("Subscribers", "Others")
    }
    assert email_of(0) in books["Others"] and email_of(0) not in books["Subscribers"]
    assert books["Subscribers"] == {email_of(n) for n in range(1, N)}
    contact = rig.held(email_of(0))
    assert contact is not None and contact["dataFields"]["NEWSLETTER_SUBSCRIBE"] == "NO"


def test_klaviyo_list_members_consented_keeps_profiles_without_consent_out_of_the_list(
    rig: Rig,
) -> None:
    if rig.kind.name != "klaviyo":
        pytest.skip("list_members is Klaviyo's: a profile in a list is emailable there")
    rig.warehouse.load(people({1: {"email_consent": "no"}, 2: {"email_consent": None}}))
    rig.configure(
        destination={"connection": "klaviyo", "list": "Newsletter", "list_members": "consented"}
    )
    first = rig.run()
    assert first.code == EXIT_OK, first.result.by_reason
    members = {p["email"] for p in rig.sandbox.list_members("Newsletter")}
    assert members == {email_of(n) for n in range(N) if n not in (1, 2)}
    assert all(rig.held(email_of(n)) is not None for n in range(N))  # every profile landed


@pytest.mark.parametrize("resubscribe", ["no_challenge", "challenge"])
def test_a_newer_consent_resubscribes_as_the_sync_says(rig: Rig, resubscribe: str) -> None:
    dotdigital_only(rig)
    rig.warehouse.load(people())
    rig.configure(
        consent={"email": {"column": "email_consent", "consented_at": "last_order_at"}},
        destination={"connection": "dotdigital", "list": "Subscribers", "resubscribe": resubscribe},
    )
    rig.run()
    rig.sandbox.act_as_person(email_of(0), "unsubscribe", at=at(50_000))
    rig.warehouse.load(people({0: {"last_order_at": at(60_000)}}, later=100))
    run = rig.run()
    [doc] = imported(run, rig).values()
    again = resubscribe == "no_challenge"
    assert doc["channelProperties"]["email"]["resubscribeOptions"] == {
        "resubscribeWithNoChallenge": again
    }
    assert status(rig, email_of(0)) == ("subscribed" if again else "pendingOptIn")


def optouts_in_warehouse(rig: Rig, table: str) -> list[tuple[Any, ...]]:
    sql = f"SELECT person, channel, status, reason FROM {table} ORDER BY person"
    c = rig.warehouse.connection
    if c["type"] == "duckdb":
        import duckdb

        with duckdb.connect(c["path"], read_only=True) as con:
            return con.execute(sql).fetchall()
    import psycopg

    with psycopg.connect(
        host=c["host"], port=c["port"], user=c["user"], password=c["password"], dbname=c["dbname"]
    ) as con:
        return con.execute(sql).fetchall()


def test_each_run_writes_the_opt_outs_read_back_to_the_warehouse_table(rig: Rig) -> None:
    rig.warehouse.load(people())
    configure(rig)
    rig.configure(
        consent={"email": {"column": "email_consent", "consented_at": "last_order_at"}},
        optouts_table="analytics.vendor_optouts",
    )
    rig.run()
    assert optouts_in_warehouse(rig, "analytics.vendor_optouts") == []
    rig.sandbox.act_as_person(email_of(2), "unsubscribe", at=at(50_000))
    rig.run()
    [(person, channel, status_, reason)] = optouts_in_warehouse(rig, "analytics.vendor_optouts")
    assert (person, channel, status_) == (email_of(2), "email", "unsubscribed")
    assert reason  # the vendor's word: UNSUBSCRIBE, Unsubscribed


def test_an_opt_outs_table_is_named_as_the_warehouse_names_tables(tmp_path: Any) -> None:
    """Every warehouse type takes the table (``Source.replace_table``, tested per warehouse
    in test_sources); BigQuery needs its dataset named."""
    from reverse_etl.config import load_project
    from reverse_etl.errors import ConfigError
    from tests.helpers import write_project

    def project(warehouse: dict[str, Any], table: str) -> None:
        write_project(
            tmp_path,
            {
                "connections": {"wh": warehouse, "kl": {"type": "klaviyo", "api_key": "k"}},
                "syncs": [
                    {
                        "name": "p",
                        "source": {"connection": "wh", "table": "t"},
                        "object": "profiles",
                        "identifier": "email",
                        "destination": {"connection": "kl"},
                        "mapping": {"email": "email"},
                        "optouts_table": table,
                    }
                ],
            },
        )
        load_project(None, tmp_path, env={})

    snowflake = {
        "type": "snowflake",
        "account": "a",
        "user": "u",
        "password": "p",
        "database": "d",
        "schema": "s",
    }
    project(snowflake, "optouts")
    project(snowflake, "analytics.optouts")
    bigquery = {"type": "bigquery", "project": "p"}
    project(bigquery, "analytics.optouts")
    with pytest.raises(ConfigError, match="optouts_table.*dataset.table"):
        project(bigquery, "optouts")
