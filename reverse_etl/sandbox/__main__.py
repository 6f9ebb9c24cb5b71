"""``python -m reverse_etl.sandbox klaviyo --port 8010``: serve a sandbox until Ctrl-C."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from reverse_etl.sandbox.dotdigital import DotdigitalSandbox
from reverse_etl.sandbox.klaviyo import KlaviyoSandbox
from reverse_etl.sandbox.server import serve_forever
from reverse_etl.sandbox.settings import ALL_FAULTS, SandboxSettings
from reverse_etl.sandbox.spec import ENV_VAR, SpecsNotFound, find_specs, use_spec_dir


def main(argv: Sequence[str] | None = None) -> None:
    defaults = SandboxSettings()
    parser = argparse.ArgumentParser(prog="python -m reverse_etl.sandbox", description=__doc__)
    parser.add_argument("vendor", choices=("klaviyo", "dotdigital"))
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--api-key", default=defaults.api_key, help="Klaviyo private key")
    parser.add_argument("--username", default=defaults.username, help="Dotdigital API user")
    parser.add_argument("--password", default=defaults.password, help="Dotdigital API password")
    parser.add_argument("--no-limits", action="store_true", help="do not enforce rate limits")
    parser.add_argument("--speedup", type=float, default=1.0, help="vendor seconds per real second")
    parser.add_argument("--fault-rate", type=float, default=0.0)
    parser.add_argument("--faults", default=",".join(ALL_FAULTS), help="comma-separated kinds")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--job-seconds", type=float, default=defaults.job_seconds)
    parser.add_argument("--no-validate", action="store_true", help="skip spec validation")
    parser.add_argument(
        "--api-specs",
        metavar="DIR",
        help=f"the vendors' OpenAPI specs (default: ${ENV_VAR}, then ../shared/api-specs)",
    )
    args = parser.parse_args(argv)
    use_spec_dir(args.api_specs)
    try:
        specs = find_specs(told=True)
    except SpecsNotFound as exc:
        sys.exit(f"error: {exc}")
    if not args.no_validate or specs.path is None:
        print(specs.describe(), file=sys.stderr, flush=True)
    settings = SandboxSettings(
        api_key=args.api_key,
        username=args.username,
        password=args.password,
        enforce_limits=not args.no_limits,
        speedup=args.speedup,
        fault_rate=args.fault_rate,
        fault_kinds=tuple(k for k in args.faults.split(",") if k),
        seed=args.seed,
        job_seconds=args.job_seconds,
        validate=not args.no_validate,
    )
    sandbox = KlaviyoSandbox(settings) if args.vendor == "klaviyo" else DotdigitalSandbox(settings)
    serve_forever(sandbox, host=args.host, port=args.port)


if __name__ == "__main__":
    main()
