"""Session set-up: float64 everywhere, and the model zoo as fixtures."""

import jax

jax.config.update("jax_enable_x64", True)

import models  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture(scope="session", params=sorted(models.ZOO))
def case(request: pytest.FixtureRequest) -> models.Case:
    """Every model kind in the zoo, built once per session."""
    return models.get(request.param)


@pytest.fixture(scope="session")
def mlp_case() -> models.Case:
    return models.get("mlp")


@pytest.fixture(scope="session")
def regression_case() -> models.Case:
    return models.get("regression")


@pytest.fixture(autouse=True)
def _runs_in_tmp(tmp_path: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """lm.train keeps runs in ./runs by default: keep each test's in its own directory."""
    monkeypatch.chdir(tmp_path)


# tests/multidevice needs several devices; tests/test_data_parallel.py runs it with 4.
collect_ignore = [] if jax.device_count() >= 4 else ["multidevice"]
