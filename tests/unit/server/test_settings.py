import pytest

from fcp_server.settings import ServerSettings, SettingsError


def test_demo_defaults_are_open_and_embedded():
    s = ServerSettings.from_env({})
    assert s.environment == "demo"
    assert (s.device_auth, s.embedded_worker, s.auto_migrate) == (False, True, True)
    assert s.admin_api_key is None
    assert s.local_compute_timeout_seconds == 900 and s.upload_timeout_seconds == 900
    assert s.resolved_blob_url.startswith("file:///")


def test_production_flips_the_secure_defaults():
    s = ServerSettings.from_env({"FCP_ENV": "production", "FCP_ADMIN_API_KEY": "k"})
    assert (s.device_auth, s.embedded_worker, s.auto_migrate) == (True, False, False)


@pytest.mark.parametrize(
    "env, message",
    [
        ({"FCP_ENV": "production"}, "FCP_ADMIN_API_KEY"),
        (
            {"FCP_ENV": "production", "FCP_ADMIN_API_KEY": "k", "FCP_DEVICE_AUTH": "false"},
            "FCP_DEVICE_AUTH",
        ),
        ({"FCP_ENV": "staging"}, "FCP_ENV"),
        ({"FCP_DEVICE_AUTH": "maybe"}, "FCP_DEVICE_AUTH"),
        ({"FCP_UPLOAD_TIMEOUT_SECONDS": "soon"}, "FCP_UPLOAD_TIMEOUT_SECONDS"),
        ({"FCP_MAX_UPLOAD_BYTES": "0"}, "FCP_MAX_UPLOAD_BYTES"),
        ({"FCP_LOG_FORMAT": "xml"}, "FCP_LOG_FORMAT"),
        ({"FCP_BLOB_TIMEOUT_SECONDS": "0"}, "FCP_BLOB_TIMEOUT_SECONDS"),
        ({"FCP_CHECKIN_ROUND_CACHE_SECONDS": "-1"}, "FCP_CHECKIN_ROUND_CACHE_SECONDS"),
        ({"FCP_CHECKIN_ROUND_CACHE_SECONDS": "nan"}, "FCP_CHECKIN_ROUND_CACHE_SECONDS"),
        ({"FCP_CHECKIN_ROUND_CACHE_SECONDS": "inf"}, "FCP_CHECKIN_ROUND_CACHE_SECONDS"),
    ],
)
def test_bad_settings_name_the_variable(env, message):
    with pytest.raises(SettingsError, match=message):
        ServerSettings.from_env(env)


def test_values_are_read_from_the_environment():
    s = ServerSettings.from_env(
        {
            "FCP_DATABASE_URL": "postgresql://u@h/db",
            "FCP_ROUND_DEADLINE_SECONDS": "60",
            "FCP_WORKER_INTERVAL_SECONDS": "0.5",
            "FCP_EMBEDDED_WORKER": "no",
            "FCP_BLOB_TIMEOUT_SECONDS": "7.5",
            "FCP_CHECKIN_ROUND_CACHE_SECONDS": "0",
        }
    )
    assert s.blob_timeout_seconds == 7.5
    assert s.checkin_round_cache_seconds == 0.0
    assert s.database_url == "postgresql://u@h/db"
    assert s.round_deadline_seconds == 60 and s.worker_interval_seconds == 0.5
    assert s.embedded_worker is False
