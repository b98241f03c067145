"""The fault matrix's fixtures: one table for the session, one scenario per test."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from helpers.matrix import ROWS, Row, Scenario, write_matrix


@pytest.fixture(scope="session")
def fault_matrix(request: pytest.FixtureRequest) -> Iterator[list[Row]]:
    yield ROWS
    write_matrix(request.config)


@pytest.fixture
def scenario(
    request: pytest.FixtureRequest, flow_env: Any, fault_matrix: list[Row]
) -> Callable[..., Scenario]:
    def make(fault: str, destination: str) -> Scenario:
        return Scenario(fault, request.node.name, flow_env, destination, fault_matrix)

    return make
