"""The MLflow UI, seen through a headless Chromium: the registered model and its `champion` alias.

Needs Debian's `chromium` (infra/setup-test.sh installs it); skipped, with the reason, without it.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from tests.browser import Browser, find_chromium

pytestmark = [
    pytest.mark.slow,
    # Decided before any fixture starts a server.
    pytest.mark.skipif(
        find_chromium() is None,
        reason="Chromium is not installed: run infra/setup-test.sh (Debian's `chromium` package)",
    ),
]

ROWS = '[role="row"]'  # the rows of MLflow's tables (header row included)
TIMEOUT_S = 60.0  # a first load of the UI takes about 3 s on a quiet 2-core machine


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with Browser() as browser:
        yield browser


def _register_versions(client: Any, name: str, count: int) -> None:
    """``name`` with ``count`` versions, all from one tiny run artifact (no training)."""
    experiment_id = client.create_experiment(f"{name}-runs")
    run = client.create_run(experiment_id)
    client.log_text(run.info.run_id, "not a real model", "model/weights.txt")
    client.set_terminated(run.info.run_id)
    client.create_registered_model(name)
    for _ in range(count):
        client.create_model_version(name, f"runs:/{run.info.run_id}/model", run_id=run.info.run_id)


def _versions(rows: list[str]) -> dict[int, str]:
    """The model page's version rows by version number; a row reads "Version 2\\n<date>\\n...@ champion"."""
    return {int(m[1]): row for row in rows if (m := re.match(r"Version (\d+)\b", row))}


def _aliases(row: str) -> set[str]:
    """The alias tags of a row ("@ champion"; not the "@" of an e-mail address)."""
    return set(re.findall(r"(?:^|\s)@ (\S+)", row))


# Explicit: a session fixture that other tests parametrize may otherwise hand over a stopped server.
@pytest.mark.parametrize("mlflow_server", ["sqlite"], indirect=True)
def test_the_model_page_shows_the_champion_alias_on_version_2(mlflow_server: Any, browser: Browser) -> None:
    from mlflow import MlflowClient

    name = f"ui-fashion-{uuid.uuid4().hex[:8]}"
    client = MlflowClient(mlflow_server.uri)
    _register_versions(client, name, 2)
    model_page = f"{mlflow_server.uri}/#/models/{name}"

    def champion_on_2(rows: list[str]) -> bool:
        return "champion" in _aliases(_versions(rows).get(2, ""))

    # Before the alias: both versions are listed, and the check below cannot pass.
    rows = browser.texts(
        ROWS, model_page, until=lambda rows: set(_versions(rows)) == {1, 2}, timeout_s=TIMEOUT_S
    )
    assert not any(_aliases(row) for row in _versions(rows).values()), rows
    with pytest.raises(TimeoutError):
        browser.texts(ROWS, until=champion_on_2, timeout_s=5)

    client.set_registered_model_alias(name, "champion", "2")

    rows = browser.texts(ROWS, model_page, until=champion_on_2, timeout_s=TIMEOUT_S)
    versions = _versions(rows)
    assert _aliases(versions[2]) == {"champion"}, rows
    assert _aliases(versions[1]) == set(), rows
    assert f"Registered Models\n{name}\n" in browser.text(until=name, timeout_s=TIMEOUT_S)

    # The models list: the model by name, its latest version and the alias pointing at version 2.
    models = browser.texts(
        ROWS,
        f"{mlflow_server.uri}/#/models",
        until=lambda rows: any(row.startswith(f"{name}\n") for row in rows),
        timeout_s=TIMEOUT_S,
    )
    (row,) = [row for row in models if row.startswith(f"{name}\n")]
    assert re.search(r"@ champion\s*: Version 2\b", row), row
