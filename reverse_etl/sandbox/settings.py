"""One settings object for both sandboxes, so tests, the demo and benchmarks tune them alike.

Time in the sandbox is *vendor time*: a rate window of one minute or a job that takes two
seconds at the vendor lasts ``1 / speedup`` of that in real time. Tests use a high speedup to
see limits and job lifecycles without waiting; benchmarks turn limits off altogether.
"""

from __future__ import annotations

from dataclasses import dataclass

#: Every fault the sandboxes can inject (see ``faults.py``).
ALL_FAULTS: tuple[str, ...] = ("429", "500", "503", "reset", "timeout", "failed_job")


@dataclass(frozen=True)
class SandboxSettings:
    """Knobs shared by :class:`KlaviyoSandbox` and :class:`DotdigitalSandbox`.

    ``api_key`` is Klaviyo's private key; ``username``/``password`` are Dotdigital's API user.
    ``fault_rate`` is the chance (0..1) that an eligible request meets one of ``fault_kinds``,
    drawn from a RNG seeded with ``seed``. ``fault_timeout_seconds`` is how long a ``timeout``
    fault stalls (real seconds; set it above the client's timeout). ``job_seconds`` is how long
    an async job runs in vendor time. ``validate`` checks requests against the vendor specs;
    it can only when the spec files are found (``spec.find_specs``): without them the sandboxes
    serve unchecked whatever ``validate`` says, and the command that starts them says so.

    The Dotdigital figures are not in the published specs (see the README of this package):
    ``dotdigital_calls_per_hour`` is the account-wide request budget,
    ``dotdigital_import_limit`` the records accepted by one contacts or insight import.
    """

    api_key: str = "pk_sandbox_0123456789abcdef"
    username: str = "apiuser-sandbox@apiconnector.com"
    password: str = "sandbox-password"
    enforce_limits: bool = True
    speedup: float = 1.0
    fault_rate: float = 0.0
    fault_kinds: tuple[str, ...] = ALL_FAULTS
    seed: int = 0
    job_seconds: float = 0.05
    validate: bool = True
    fault_timeout_seconds: float = 30.0
    fault_retry_after: int = 1
    dotdigital_calls_per_hour: int = 2000
    dotdigital_import_limit: int = 5000
    # Dotdigital call rate scheme of the API user: "hourly" (the deprecated flat scheme, one
    # budget an hour) or "tiered" (per-minute limits per call tier, limits.TieredWindows)
    dotdigital_rate_scheme: str = "hourly"
    # per-minute call limits of the tiered scheme: (tier, calls a minute); a tier not listed
    # is unlimited. Low is the documented Basic figure; medium and high are UNCONFIRMED
    dotdigital_tier_limits: tuple[tuple[str, int], ...] = (
        ("low", 35),
        ("medium", 180),
        ("high", 450),
    )
    # the Dotdigital account's region (r1, r2, r3): a request addressed to another region's
    # host answers 403 as Dotdigital does; "" accepts every host (today's behaviour)
    dotdigital_region: str = ""
    # a contact in a suppression status in an import is not updated but counted in the
    # report's summary.globallySuppressed (False: counted as updated, today's behaviour)
    dotdigital_report_suppressed: bool = False
    # Klaviyo bulk events whose unique_id repeats for a profile and metric: "drop" (a repeat
    # inside one entry is 400, a resent one is dropped silently; today's behaviour) or
    # "refuse_call" (any repeat in the call, or of an event seen before, refuses the call)
    klaviyo_duplicate_events: str = "drop"
    # Klaviyo checks phone numbers against numbering plans (phonenumbers' is_valid_number), not
    # only the E.164 shape: an invalid one refuses a subscribe/unsubscribe call (400) and fails
    # its profile in a bulk import (an import error); False: E.164 shape only (today's behaviour)
    klaviyo_strict_phone_numbers: bool = False
    # the Klaviyo key's scopes, e.g. ("profiles:write", "lists:read"): an operation needing a
    # scope of its x-klaviyo-scopes the key lacks is 403 permission_denied (X:write also grants
    # X:read); () is a full-access key (today's behaviour)
    klaviyo_key_scopes: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.speedup <= 0:
            raise ValueError("speedup must be > 0")
        if not 0.0 <= self.fault_rate <= 1.0:
            raise ValueError("fault_rate must be between 0 and 1")
        unknown = set(self.fault_kinds) - set(ALL_FAULTS)
        if unknown:
            raise ValueError(f"unknown fault kinds {sorted(unknown)}; known: {ALL_FAULTS}")

    def real_seconds(self, vendor_seconds: float) -> float:
        """Real time that ``vendor_seconds`` of vendor time lasts under ``speedup``."""
        return vendor_seconds / self.speedup
