import pytest

from common.env import Settings, SettingsError
from settings import ServiceSettings

LOCAL = Settings.from_env({})


def test_defaults_and_overrides():
    assert ServiceSettings.from_env(LOCAL, {}) == ServiceSettings()
    options = ServiceSettings.from_env(LOCAL, {"SCHEDULER_INTERVAL_SEC": "30", "SCHEDULER_CATCHUP_SEC": "120"})
    assert (options.interval_sec, options.catchup_sec, options.dry_run_check_sec) == (30.0, 120.0, 3.0)


@pytest.mark.parametrize("name, value", [("SCHEDULER_INTERVAL_SEC", "0"), ("SCHEDULER_CATCHUP_SEC", "soon"),
                                         ("SCHEDULER_CONCURRENCY", "1000")])
def test_bad_values_name_the_variable(name, value):
    with pytest.raises(SettingsError, match=name):
        ServiceSettings.from_env(LOCAL, {name: value})


def test_production_without_a_database_password_is_refused():
    production = Settings.from_env({"APP_ENV": "production", "PG_PASS": "hydro"})
    with pytest.raises(SettingsError, match="PG_PASS"):
        ServiceSettings.from_env(production, {})
    assert ServiceSettings.from_env(production.replace(pg_pass="a-real-secret"), {}) == ServiceSettings()
