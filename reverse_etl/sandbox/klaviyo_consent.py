"""Klaviyo's bulk subscribe and unsubscribe jobs: email/SMS consent per profile, and the email
marketing suppressions they lift or make (``subscribe``, ``unsubscribe``)."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from datetime import datetime
from typing import Any

from starlette.responses import Response

from reverse_etl.sandbox.base import Call
from reverse_etl.sandbox.jobs import Job, utcnow
from reverse_etl.sandbox.klaviyo_common import (
    CHUNK,
    MAX_SUBSCRIBE,
    MAX_UNSUBSCRIBE,
    KlaviyoBase,
    accepted,
    bad,
    over_limit,
    parse_time,
)
from reverse_etl.sandbox.klaviyo_state import LIFTED_BY_SUBSCRIBE, ProfileError, now_iso

# per profile: (its id or None, its attributes, its (channel, kind, consented_at) consents)
_Plan = list[tuple[str | None, Mapping[str, Any], list[tuple[str, str, str | None]]]]


class ConsentAPI(KlaviyoBase):
    """POST /api/profile-subscription-bulk-create-jobs and -delete-jobs."""

    # --- consent ----------------------------------------------------------------------------

    def _consent_list(self, call: Call) -> str | None:
        rel = ((call.body["data"].get("relationships") or {}).get("list") or {}).get("data")
        if rel is None:
            return None
        self._require_lists([rel["id"]], "/data/relationships/list/data/id")
        return str(rel["id"])

    async def subscribe(self, call: Call) -> Response:
        """bulk_subscribe_profiles. Each consent asked for becomes SUBSCRIBED, dated
        ``consented_at`` (a historical import) or the time the job is processed.

        For email marketing it also lifts suppressions, as the operation's description says:
        "This API will remove any `UNSUBSCRIBE`, `SPAM_REPORT` or `USER_SUPPRESSED`
        suppressions from the provided profiles." The suppression reason enum has no
        SPAM_REPORT; its SPAM_COMPLAINT is taken to be meant. HARD_BOUNCE and INVALID_EMAIL
        suppressions stay, so such a profile is SUBSCRIBED but cannot receive email marketing.
        That the lift applies only when email marketing is in the request (not for an
        SMS-only subscribe) is the sandbox's reading.
        """
        attrs = call.body["data"]["attributes"]
        profiles = attrs["profiles"]["data"]
        where = "/data/attributes/profiles/data"
        if len(profiles) > MAX_SUBSCRIBE:
            raise over_limit(f"{len(profiles)} profiles; at most {MAX_SUBSCRIBE} per call.", where)
        historical = bool(attrs.get("historical_import"))
        list_id = self._consent_list(call)
        received = utcnow()
        plan: _Plan = []
        for i, p in enumerate(profiles):
            a = p["attributes"]
            self._check_identity(i, a, p.get("id"), where)
            consents = self._consents(i, a, p.get("id"), historical, received, where)
            plan.append((p.get("id"), a, consents))
        record = {
            "historical_import": historical,
            "custom_source": attrs.get("custom_source"),
            "list_id": list_id,
            "method": "API",
            "method_detail": None,
        }
        self.jobs.submit(
            Job("profile-subscription-bulk-create-job", len(plan)),
            self._consent_work(plan, record, list_id, True),
        )
        return accepted()

    def _consents(
        self,
        i: int,
        a: Mapping[str, Any],
        profile_id: str | None,
        historical: bool,
        received: datetime,
        where: str,
    ) -> list[tuple[str, str, str | None]]:
        """(channel, kind, consented_at) for each consent asked for; 400s for misuse."""
        subs = a.get("subscriptions") or {}
        out: list[tuple[str, str, str | None]] = []
        for channel, params in subs.items():
            if params is None:
                continue
            needs = (
                "email"
                if channel == "email"
                else "phone_number"
                if channel in ("sms", "whatsapp")
                else None
            )
            if needs and a.get(needs) is None and profile_id is None:
                raise bad(
                    f"Subscribing to {channel} needs {needs}.", f"{where}/{i}/attributes/{needs}"
                )
            for kind, detail in params.items():
                if kind in ("tokens", "anonymous_id") or detail is None:
                    continue
                ptr = f"{where}/{i}/attributes/subscriptions/{channel}/{kind}/consented_at"
                at = detail.get("consented_at")
                if at is not None and not historical:
                    raise bad("consented_at may only be given with historical_import: true.", ptr)
                if historical and kind == "marketing" and at is None:
                    raise bad(
                        "historical_import needs consented_at for every marketing consent.", ptr
                    )
                if at is not None and parse_time(at) > received:
                    raise bad("consented_at must be in the past.", ptr)
                out.append((channel, kind, at))
        if not out:
            raise bad("No channel to subscribe to.", f"{where}/{i}/attributes/subscriptions")
        return out

    def _consent_work(
        self,
        plan: _Plan,
        record: Mapping[str, Any],
        list_id: str | None,
        subscribe: bool,
    ) -> Iterator[None]:
        state = self.state
        received = now_iso()  # when processing starts: the time of consent not dated
        for start in range(0, len(plan), CHUNK):
            done = []
            stamp = now_iso()  # one clock read a chunk, as the import does
            for profile_id, a, consents in plan[start : start + CHUNK]:
                ident = {k: a[k] for k in ("email", "phone_number") if a.get(k) is not None}
                try:
                    pid, _ = state.upsert(ident, profile_id=profile_id, stamp=stamp)
                except ProfileError as e:
                    self.async_errors.append(
                        {
                            "kind": "consent",
                            "code": e.code,
                            "detail": e.detail,
                            "attributes": dict(a),
                        }
                    )
                    continue
                for channel, kind, at in consents:
                    consent = "SUBSCRIBED" if subscribe else "UNSUBSCRIBED"
                    state.set_consent(
                        pid,
                        channel,
                        kind,
                        {"consent": consent, "consented_at": at or received, **record},
                        stamp=stamp,
                    )
                    if (channel, kind) != ("email", "marketing"):
                        continue
                    if subscribe:
                        state.unsuppress(pid, LIFTED_BY_SUBSCRIBE, stamp)
                    else:
                        state.suppress(pid, "UNSUBSCRIBE", received, stamp)
                done.append(pid)
            if list_id is not None:
                (state.add_members if subscribe else state.remove_members)(list_id, done)
            yield

    async def unsubscribe(self, call: Call) -> Response:
        """bulk_unsubscribe_profiles. Each consent named becomes UNSUBSCRIBED, dated the time
        the job is processed (the request has no consent time to give).

        For email marketing the profile also gets an UNSUBSCRIBE suppression at that time (one
        per reason: an existing one is moved to it). ASSUMED, UNCONFIRMED in the docs: neither
        the operation's description nor the spec says which suppression, if any, the endpoint
        writes. It is assumed because the spec's suppression reasons include UNSUBSCRIBE, the
        subscribe endpoint is documented to remove UNSUBSCRIBE suppressions (so something must
        make them), and Klaviyo's help centre ("Understanding suppressed email profiles") says
        "When someone unsubscribes, Klaviyo will suppress them" (another version of that page
        says unsubscribes are "not displayed as suppression reasons" in the app). A client
        should not depend on it: read ``consent`` as well as ``suppression``.
        """
        attrs = call.body["data"]["attributes"]
        profiles = attrs["profiles"]["data"]
        where = "/data/attributes/profiles/data"
        if len(profiles) > MAX_UNSUBSCRIBE:
            raise over_limit(
                f"{len(profiles)} profiles; at most {MAX_UNSUBSCRIBE} per call.", where
            )
        list_id = self._consent_list(call)
        plan: _Plan = []
        for i, p in enumerate(profiles):
            a = p["attributes"]
            self._check_identity(i, a, None, where)
            consents = self._consents(i, a, None, False, utcnow(), where)
            plan.append((None, a, consents))
        record = {
            "historical_import": False,
            "custom_source": None,
            "list_id": list_id,
            "method": "API",
            "method_detail": None,
        }
        self.jobs.submit(
            Job("profile-subscription-bulk-delete-job", len(plan)),
            self._consent_work(plan, record, list_id, False),
        )
        return accepted()
