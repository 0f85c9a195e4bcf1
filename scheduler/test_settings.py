import pytest

from common.env import SettingsError
from settings import SchedulerConfig


def test_defaults_and_overrides():
    assert SchedulerConfig.from_env({}) == SchedulerConfig()
    config = SchedulerConfig.from_env({"SCHEDULER_INTERVAL_SEC": "30", "SCHEDULER_CATCHUP_SEC": "120"})
    assert (config.interval_sec, config.catchup_sec, config.dry_run_check_sec) == (30.0, 120.0, 3.0)


@pytest.mark.parametrize("name, value", [("SCHEDULER_INTERVAL_SEC", "0"), ("SCHEDULER_CATCHUP_SEC", "soon"),
                                         ("SCHEDULER_CONCURRENCY", "1000")])
def test_bad_values_name_the_variable(name, value):
    with pytest.raises(SettingsError, match=name):
        SchedulerConfig.from_env({name: value})
