"""Property-based API testing with schemathesis, from the app's own /openapi.json.

Schemathesis generates valid and invalid requests for every documented
operation (bounded examples each, so the module runs in well under a minute)
and checks the answers: never a 5xx, status codes and bodies as documented,
invalid input refused, authentication not ignored. It runs against the real
app over ASGI with a real SQLite store holding realistic calls, authenticated
with a real API token.
"""

import uuid

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import negative_data_rejection

from gateway.config import Settings
from gateway.store.db import make_engine, make_sessionmaker
from gateway.store.users import create_token, create_user
from gateway.web import Dashboard
from tests.pg_server import pg_store_url, prompt_texts, recorded_call, store_url  # noqa: F401
from tests.unit.test_web_app import store_calls

TOKEN: dict[str, str] = {}


@pytest.fixture
def api_schema(store_url, tmp_path):
    """The API of a dashboard over a migrated store (SQLite, and PostgreSQL when the shared server is up)."""
    engine = make_engine(store_url)
    texts = prompt_texts()
    with make_sessionmaker(engine)() as s:
        user = create_user(s, f"fuzzer-{uuid.uuid4().hex[:8]}", "correct horse battery", "admin")
        _, TOKEN["value"] = create_token(s, user, "schemathesis")
        s.commit()
        store_calls(s, [recorded_call(texts[i:i + 3], digits="1#", tags=("support", f"t{i}")) for i in range(0, 12, 3)]
                    + [recorded_call(texts[20:22], ended=False, from_user="carol")])
    dashboard = Dashboard(Settings(database_url=store_url, web_secret_file=str(tmp_path / "secret")), engine=engine)
    yield schemathesis.openapi.from_asgi("/openapi.json", dashboard.asgi)
    engine.dispose()


OPERATIONS = ["GET /api/calls", "GET /api/calls/{call_id}", "GET /api/search", "GET /api/live", "GET /api/me",
              "GET /api/users"]


# schemathesis' own pytest plugin (from_fixture) does not work with this pytest, so each
# documented operation is driven through Hypothesis directly, positive and negative
@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE], ids=lambda m: m.value)
def test_api_conforms_to_its_openapi_document(api_schema, mode):
    operations = [result.ok() for result in api_schema.get_all_operations()]
    assert sorted(f"{op.method.upper()} {op.path}" for op in operations) == sorted(OPERATIONS)
    headers = {"Authorization": f"Bearer {TOKEN['value']}"}
    statuses: dict[str, set[int]] = {}
    for operation in operations:
        @given(case=operation.as_strategy(generation_mode=mode))
        @settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        def check(case):
            # negative_data_rejection is left out: in a query string every value is text, so
            # "tag=true" is a valid tag although the generator meant it as a non-string
            response = case.call_and_validate(headers=headers, excluded_checks=[negative_data_rejection])
            statuses.setdefault(operation.path, set()).add(response.status_code)

        check()
    assert all(code < 500 for codes in statuses.values() for code in codes), statuses
    if mode is GenerationMode.POSITIVE:
        assert 200 in statuses["/api/calls"] and 200 in statuses["/api/search"]
    else:
        assert 422 in statuses["/api/calls"]
