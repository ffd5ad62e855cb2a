"""Declared constraints (flo_coord/constraints.py): one rule for Python construction and decoding.

A config Struct built in Python and the same values decoded from TOML are refused alike, and
the ConfigError names the field (its dotted path in the file), shows the value and says what is
allowed; values that pass are normalised the same way (an int for seconds becomes a float).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from flo_coord.errors import ConfigError, ValidationError
from flo_coord.execution.breaker import BreakerConfig
from flo_coord.execution.coordinator import ExecutorConfig
from flo_coord.models import FailoverConfig
from flo_coord.settings import load_settings
from flo_coord.store import validation


@pytest.mark.parametrize(
    ("build", "section", "key", "value", "allowed"),
    [
        (FailoverConfig, "failover", "max_retries", -1, "an integer >= 0"),
        (FailoverConfig, "failover", "failover_timeout", 0, "seconds from 0.001"),
        (ExecutorConfig, "executor", "stall_timeout", -2.5, "seconds from 0.001"),
        (BreakerConfig, "breaker", "threshold", 0, "an integer >= 1"),
    ],
)
def test_python_and_toml_refuse_the_same_value_naming_field_value_and_rule(
    tmp_path: Path, build: Any, section: str, key: str, value: Any, allowed: str
) -> None:
    with pytest.raises(ConfigError) as built:
        build(**{key: value})
    assert f"{build.__name__}.{key} {value!r} is not" in str(built.value) and allowed in str(built.value)
    path = tmp_path / "flo.toml"
    path.write_text(f"[{section}]\n{key} = {value}\n", encoding="utf-8")
    with pytest.raises(ConfigError) as loaded:
        load_settings(path, environ={})
    assert f"{section}.{key} {value!r} is not" in str(loaded.value) and allowed in str(loaded.value)


def test_a_nested_table_is_named_by_its_path(tmp_path: Path) -> None:
    path = tmp_path / "flo.toml"
    path.write_text(
        '[[backends]]\nname = "Vllm"\nbase_url = "http://h:1"\nmodel = "m"\n\n'
        '[[models]]\nname = "g"\ndeployments = [{ name = "Vllm", tier = 0 }]\n',
        encoding="utf-8",
    )
    with pytest.raises(ConfigError, match=r"models\[0\]\.deployments\[0\]\.tier 0 is not an integer >= 1"):
        load_settings(path, environ={})


def test_values_that_pass_are_normalised_alike_in_python_and_from_the_environment() -> None:
    assert ExecutorConfig(stall_timeout=2).stall_timeout == 2.0
    assert isinstance(ExecutorConfig(stall_timeout=2).stall_timeout, float)
    assert load_settings(None, environ={"FLO_LEASE_TTL": "2"}).ownership.lease_ttl == 2.0


@pytest.mark.parametrize("value", ["a b", "", "x" * 129, "{tag}", 7, None, ["id"], "\ud800"])
def test_a_bad_request_id_is_a_validation_error_every_time(value: Any) -> None:
    # twice: the cache of checked ids must never let a bad one through the second time
    for _ in range(2):
        with pytest.raises(ValidationError, match="request id"):
            validation.request_id(value, validation.Limits())
    assert validation.request_id("req-1", validation.Limits(max_request_id_length=5)) == "req-1"
    with pytest.raises(ValidationError, match="1 to 4 characters"):
        validation.request_id("req-1", validation.Limits(max_request_id_length=4))
