"""Schemathesis fuzz of every operation in /openapi.json against the real app (WSGI, in-process).

Each operation gets its own live population (an OPEN task, assignments in every state) and is
fuzzed with positive (schema-conforming) and negative (schema-violating) cases, with path ids
either generated or naming the live entities, so bodies reach the services. Every answer must
be below 500, conform to the description (status, content type, JSON schema), and every 4xx
must be the error document with a message. Deterministic: derandomized Hypothesis, no database.
"""

import collections
import json

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.errors import FailureGroup
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_schema_conformance,
    status_code_conformance,
)

from fcp_server.api import openapi_routes
from fcp_server.api.openapi_routes import DOCUMENT_PATH

# Binary protobuf bodies are bytes on the wire, like octet-stream (a process-wide registration
# in schemathesis; harmless to other tests).
schemathesis.serializer.alias("application/x-protobuf", "application/octet-stream")

EXAMPLES_PER_MODE = 30
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]
# ODP's check-in answers an unauthenticated device with a RejectionInfo, not an error document.
_PROTOCOL_4XX = {("POST", "/taskassignment/v1/population/{pop}:create-task-assignment", 401)}

pytestmark = pytest.mark.slow  # fuzzing: about a minute per database


def _content_type(headers) -> str:
    for name, values in headers.items():
        if name.lower() == "content-type":
            return values[0] if isinstance(values, list) else values
    return ""


def _error_problem(method: str, path: str, status: int, content_type: str, body: bytes) -> str:
    if (method, path, status) in _PROTOCOL_4XX:
        return ""
    if not content_type.startswith("application/json"):
        return f"4xx with Content-Type {content_type!r}"
    try:
        error = json.loads(body)["error"]
    except (ValueError, KeyError, TypeError):
        return f"4xx body is not the error document: {body[:120]!r}"
    if error.get("code") != status or not error.get("status") or not error.get("message"):
        return f"4xx error document is incomplete: {error}"
    return ""


def _fuzz(operation, mode, live_paths, record):
    strategies = [operation.as_strategy(generation_mode=mode)]
    names = {p.name for p in operation.path_parameters}
    for option in live_paths:
        fixed = {k: v for k, v in option.items() if k in names}
        if fixed:
            strategies.append(operation.as_strategy(generation_mode=mode, path_parameters=fixed))
    checks = CHECKS + ([negative_data_rejection] if mode == GenerationMode.NEGATIVE else [])

    @settings(
        max_examples=EXAMPLES_PER_MODE,
        derandomize=True,
        database=None,
        deadline=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(case=st.one_of(strategies))
    def run(case):
        response = case.call()
        problems = []
        try:
            case.validate_response(response, checks=checks)
        except FailureGroup as group:  # collect every failure, keep fuzzing
            problems.extend(f"{f.title}: {f.message}"[:300] for f in group.exceptions)
        status = response.status_code
        if 400 <= status < 500:
            problem = _error_problem(
                operation.method.upper(),
                operation.path,
                status,
                _content_type(response.headers),
                response.content,
            )
            if problem:
                problems.append(problem)
        record(operation, mode, status, problems, case)

    try:
        run()
    except Unsatisfiable:
        # Nothing of the operation can be negated (no body, no constrained parameter).
        if mode != GenerationMode.NEGATIVE:
            raise


def test_every_operation_survives_fuzzing(app, population, capsys):
    # Arrange
    schema = schemathesis.openapi.from_wsgi(DOCUMENT_PATH, app)
    operations = [result.ok() for result in schema.get_all_operations()]
    tried = collections.Counter()
    statuses = collections.Counter()
    failures = {}  # (operation, mode, status, problem) -> first case that showed it

    def record(operation, mode, status, problems, case):
        tried[operation.label] += 1
        statuses[status // 100] += 1
        for problem in problems:
            key = f"{operation.label} [{mode.value}] {status}: {problem.splitlines()[0]}"
            failures.setdefault(key, f"{problem}\n  e.g. {case!r}"[:600])

    # Act
    for operation in operations:
        live = population()
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            _fuzz(operation, mode, live.path_options(), record)

    # Assert
    with capsys.disabled():
        print(
            f"\nschemathesis: {sum(tried.values())} cases over {len(operations)} operations; "
            f"answers by class: {dict(sorted(statuses.items()))}; {len(failures)} problems"
        )
    # Every operation but the document's own (schemathesis leaves it out) was fuzzed.
    assert len(operations) == len(openapi_routes.routes()) - 1
    assert set(tried) == {operation.label for operation in operations}
    assert not failures, "\n".join(f"{k}\n  {v}" for k, v in sorted(failures.items()))
