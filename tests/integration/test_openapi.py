"""/openapi.json is true: its operations are exactly the app's routes, and schemathesis finds no
5xx and no answer outside the schema on a live appliance with the demo model."""

from __future__ import annotations

import json
import time
from typing import Any

import httpx
import pytest
import schemathesis
from falcon import inspect
from hypothesis import HealthCheck, settings
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.core import NOT_SET
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
    unsupported_method,
)

from appliance.api.openapi import spec
from appliance.builder import build
from appliance.config import compose, load

pytestmark = pytest.mark.timeout(180)

ADMIN = "openapi-test-admin-key"
# The test profile: the demo model, at most 8 tokens a request, so hundreds of cases stay fast.
APPLIANCE_OVERRIDES = ("models.catalog.demo.max_tokens=8", "maintenance.helper_probe.enabled=false")
APPLIANCE_ENV = {"LMX_ADMIN_KEY": ADMIN}
MAX_EXAMPLES = 30
INPUTLESS_CALLS = 5
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    negative_data_rejection,
    unsupported_method,
]
# Admin calls that change state are left out: loading or unloading models mid-run.
STATEFUL = {("POST", "/admin/models/load"), ("POST", "/admin/models/unload")}

CASES: dict[str, int] = {}


def too_slow(body: Any) -> bool:
    """Embedding batches at the spec's limits (2048 inputs, 1000 documents) take 10-20 s on the
    CPU demo model (one input at a time): leave them out to keep the run bounded."""
    if not isinstance(body, dict):
        return False
    big = [v for k in ("input", "documents") if isinstance(v := body.get(k), list) and len(v) > 64]
    return bool(big)


def routes(overrides: list[str]) -> set[tuple[str, str]]:
    """(method, path) of every responder the app really has (Falcon's own defaults left out)."""
    app = build(load(compose(overrides))).app
    return {
        (m.method, r.path)
        for r in inspect.inspect_app(app).routes
        for m in r.methods
        if not m.internal
    }


def operations(doc: dict[str, Any]) -> set[tuple[str, str]]:
    return {
        (method.upper(), path)
        for path, item in doc["paths"].items()
        for method in item
        if method != "parameters"
    }


@pytest.mark.parametrize("overrides", [[], ["+profile=mono512", "metrics.path=/prom"]])
def test_spec_covers_exactly_the_routes(overrides: list[str]) -> None:
    cfg = load(compose(overrides))
    have, documented = routes(overrides), operations(spec(cfg))
    assert have - documented == set(), "routes without a spec entry (add them to api/openapi.py)"
    assert documented - have == set(), "spec entries without a route"


def test_spec_is_valid_openapi_31() -> None:
    import jsonschema_rs
    from schemathesis.specs.openapi.definitions import OPENAPI_31

    errors = [
        str(e)
        for e in jsonschema_rs.validator_for(OPENAPI_31).iter_errors(
            spec(load(compose(["+profile=mono512"])))
        )
    ]
    assert errors == []


def test_every_operation_documents_its_errors() -> None:
    doc = spec(load(compose([])))
    for path, item in doc["paths"].items():
        # Anthropic's routes answer Anthropic's error object, and 529 where others say 503.
        anthropic = path.startswith("/v1/messages")
        unavailable, error = ("529", "AnthropicError") if anthropic else ("503", "Error")
        for method, op in item.items():
            if method == "parameters":
                continue
            codes = set(op["responses"])
            assert "200" in codes, (method, path)
            if method == "post":
                assert {"400", "401", "403", "413", "429", unavailable} <= codes, (method, path)
            for code in codes - {"200"}:
                ref = op["responses"][code]["$ref"].rsplit("/", 1)[1]
                content = doc["components"]["responses"][ref]["content"]
                assert content["application/json"]["schema"] == {
                    "$ref": f"#/components/schemas/{error}"
                }
    schemes = doc["components"]["securitySchemes"]
    assert schemes["bearer"]["scheme"] == "bearer"
    assert schemes["apiKey"] == {"type": "apiKey", "in": "header", "name": "X-API-Key"}


def test_served_spec_is_the_generated_one(module_appliance: Any) -> None:
    r = httpx.get(module_appliance.url + "/openapi.json", timeout=10)
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("application/json")
    assert r.json() == json.loads(json.dumps(TEST_SPEC))


@pytest.fixture(scope="module")
def report(request: pytest.FixtureRequest) -> Any:
    """Prints how many cases schemathesis tried (in the terminal summary, -q or not)."""
    started = time.monotonic()
    yield
    total = sum(CASES.values())
    line = (
        f"schemathesis: {total} cases over {len(CASES)} operations in "
        f"{time.monotonic() - started:.1f} s ("
        + ", ".join(f"{k}: {v}" for k, v in sorted(CASES.items()))
        + ")"
    )
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if capture is not None:
        with capture.global_and_fixture_disabled():
            print("\n" + line)
    else:
        print(line)


# The schema is the one the server serves (test_served_spec_is_the_generated_one), built here
# from the same config so that pytest can collect one test per operation before any server runs.
TEST_SPEC = spec(load(compose(list(APPLIANCE_OVERRIDES))))
DOCUMENTED = operations(TEST_SPEC)
SCHEMA = schemathesis.openapi.from_dict(TEST_SPEC)
SCHEMA.config.generation.update(
    modes=[GenerationMode.POSITIVE, GenerationMode.NEGATIVE],
    max_examples=MAX_EXAMPLES,
    deterministic=True,
)


@SCHEMA.exclude(method="POST", path_regex=r"^/admin/models/(load|unload)$").parametrize()
@settings(
    max_examples=MAX_EXAMPLES,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=list(HealthCheck),
)
def test_api_conforms(case: Any, module_appliance: Any, report: Any) -> None:
    """Positive and negative cases, MAX_EXAMPLES per operation and phase."""
    documented = (case.method.upper(), case.path) in DOCUMENTED
    key = f"{case.method} {case.path}" if documented else "undocumented methods (405)"
    assert (case.method.upper(), case.path) not in STATEFUL
    # Without a body there is little to vary (headers): a few calls say as much as 30.
    if case.body is NOT_SET and CASES.get(key, 0) >= INPUTLESS_CALLS:
        return
    if too_slow(case.body):
        return
    CASES[key] = CASES.get(key, 0) + 1
    case.call_and_validate(
        base_url=module_appliance.url,
        timeout=60,
        headers={"Authorization": f"Bearer {ADMIN}"},
        checks=CHECKS,
    )


def test_a_tiny_repetition_penalty_is_refused(module_appliance: Any) -> None:
    # Once answered 200 with null logprobs (the logits became infinite).
    r = httpx.post(
        module_appliance.url + "/v1/completions",
        timeout=30,
        json={"prompt": "0", "max_tokens": 3, "logprobs": 1, "repetition_penalty": 5e-324},
    )
    assert r.status_code == 400
    assert r.json()["error"]["param"] == "repetition_penalty"
