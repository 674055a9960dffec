"""Schemathesis property tests against the service's /openapi.json: no input makes it answer 5xx."""

from __future__ import annotations

import tempfile
from pathlib import Path

import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error

from compressor.service.app import ServiceConfig, create_app

app = create_app(ServiceConfig(data_dir=Path(tempfile.mkdtemp(prefix="compressor-schema-"))))
schema = schemathesis.openapi.from_asgi("/openapi.json", app)


@schema.parametrize()
@settings(max_examples=15, deadline=None, suppress_health_check=list(HealthCheck))
def test_no_server_errors(case):
    response = case.call()
    case.validate_response(response, checks=[not_a_server_error])
