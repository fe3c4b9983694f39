"""Issue 12: "Fuzz the API with schemathesis (PyPI) against its own OpenAPI document in the test
suite." The live admin API of a real relay (with queued mail) is driven from its /openapi.json;
every answer must be a documented status with a JSON body of the documented shape, never a 5xx."""

from __future__ import annotations

import json
import urllib.request

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import positive_data_acceptance

from tests.support.loopthread import LoopThread
from tests.support.relay import RelayHarness

# Bounded so the whole fuzz run stays well under a minute on a loaded 2-core machine.
EXAMPLES = 25


@pytest.fixture(scope="module")
def live_admin(tmp_path_factory):
    d = tmp_path_factory.mktemp("fuzz")
    lt = LoopThread("fuzz-relay")
    h = RelayHarness(d, 'Gateway = 127.0.0.9\nConnect_Timeout = 1s\nretry_interval = 1h\n'
                        'Admin_Listener {\n  Listen "127.0.0.1:0" { }\n}\n')
    lt.run(h.start())

    async def fill() -> None:
        from fastrelay.message import Envelope, Recipient

        items = [(Envelope("s@example.com", [Recipient(f"r{i}@fuzz.test")], "fuzz.test",
                           next_attempt=9e9), b"Subject: fuzz\r\n\r\nbody\r\n") for i in range(5)]
        await h.relay.submit(items)

    lt.run(fill())
    port = h.relay.admin_servers[0].sockets[0].getsockname()[1]
    yield f"http://127.0.0.1:{port}"
    lt.run(h.stop())
    lt.stop()


def _schema():
    from fastrelay.admin.openapi import document

    return schemathesis.openapi.from_dict(document())


schema = _schema()


def test_the_served_document_is_the_one_fuzzed(live_admin):
    with urllib.request.urlopen(live_admin + "/openapi.json") as r:
        assert json.loads(r.read()) == schema.raw_schema


@schema.parametrize()
@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
def test_admin_api_against_its_openapi(case, live_admin):
    # JSON Schema cannot say what an RFC 5321 address is: a schema-valid string may still be no
    # address, and injection rightly refuses it (400). Every other check applies there too.
    excluded = [positive_data_acceptance] if case.path == "/api/v1/inject" else []
    case.call_and_validate(base_url=live_admin, excluded_checks=excluded)
