"""Local emulators of the Klaviyo and Dotdigital APIs for tests, the demo and benchmarks.

They check every request against the vendors' published OpenAPI specs and limits, keep the
account in memory for tests to inspect, and can slow down, throttle or break on purpose.

    from reverse_etl.sandbox import KlaviyoSandbox, SandboxServer, SandboxSettings

    sandbox = KlaviyoSandbox(SandboxSettings(speedup=60))
    with SandboxServer(sandbox) as server:
        ...  # point the client at server.base_url
    assert sandbox.violations == []
"""

from reverse_etl.extras import requires

with requires("sandbox", "the sandbox"):  # a missing library names the extra to install
    from reverse_etl.sandbox.dotdigital import DotdigitalSandbox
    from reverse_etl.sandbox.klaviyo import KlaviyoSandbox
    from reverse_etl.sandbox.server import SandboxServer, serve_forever
    from reverse_etl.sandbox.settings import ALL_FAULTS, SandboxSettings
    from reverse_etl.sandbox.spec import Violation

__all__ = [
    "ALL_FAULTS",
    "DotdigitalSandbox",
    "KlaviyoSandbox",
    "SandboxServer",
    "SandboxSettings",
    "Violation",
    "serve_forever",
]
