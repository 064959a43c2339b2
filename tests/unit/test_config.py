"""Unit tests of `dataproc.config` with literals: defaults, every variable, the original
service's names (POSTGRES_*, SERVER_URL/PORT, ALGORITHM, JWT_*), `.env` reading, and the
schema as the one source: the README's table and `.env.example` list exactly its variables,
each with its default."""

from __future__ import annotations

import dataclasses
import re

import pytest
from psycopg.conninfo import conninfo_to_dict

from dataproc.config import SETTINGS, VARIABLES, Config, ConfigError, from_env, read_dotenv
from support import REPO

KEY_A = "a" * 32
KEY_B = "b" * 32


def env(**values: str) -> Config:
    """`from_env` on exactly these variables, no `.env` file."""
    return from_env(values, dotenv_path=None)


def refused(**values: str) -> str:
    with pytest.raises(ConfigError) as caught:
        env(**values)
    return str(caught.value)


# --- defaults -----------------------------------------------------------------------------


def test_an_empty_environment_gives_the_defaults():
    config = env()
    assert config == Config()
    assert (config.host, config.port, config.workers) == ("127.0.0.1", 8080, 1)
    assert (config.access_ttl_s, config.refresh_ttl_s) == (1800, 604800)
    assert config.bcrypt_cost == 12 and config.invalid_tags == ("system", "suspect")
    assert (config.max_age_s, config.upstream_timeout_s) == (3600, 10)
    assert config.upstream_max_bytes == 65536
    assert config.database_url is None
    assert config.upstream_url is None and config.jwt_secret_key is None


def test_empty_values_count_as_unset():
    assert env(DATAPROC_PORT="", SERVER_URL=" ", JWT_SECRET_KEY="") == Config()


def test_the_config_is_frozen_and_replace_makes_a_copy():
    config = env()
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.port = 1  # type: ignore[misc]
    assert config.replace(port=9).port == 9 and config.port == 8080


# --- every variable -----------------------------------------------------------------------

PARSED = [  # (variable, raw value, field, parsed value)
    ("JWT_SECRET_KEY", KEY_A, "jwt_secret_key", KEY_A),
    ("JWT_REFRESH_SECRET_KEY", KEY_B, "jwt_refresh_secret_key", KEY_B),
    ("ACCESS_TOKEN_EXPIRE_MINUTES", "15", "access_ttl_s", 900),
    ("REFRESH_TOKEN_EXPIRE_MINUTES", "60", "refresh_ttl_s", 3600),
    ("DATAPROC_HOST", "0.0.0.0", "host", "0.0.0.0"),
    ("DATAPROC_PORT", "0", "port", 0),
    ("DATAPROC_WORKERS", "4", "workers", 4),
    ("DATAPROC_DATA_DIR", "/var/lib/dataproc", "data_dir", "/var/lib/dataproc"),
    ("DATAPROC_BCRYPT_COST", "10", "bcrypt_cost", 10),
    ("DATAPROC_PASSWORD_MIN_BYTES", "12", "password_min_bytes", 12),
    ("DATAPROC_INVALID_TAGS", "system, broken,,x ", "invalid_tags", ("system", "broken", "x")),
    ("DATAPROC_MAX_AGE_S", "90.5", "max_age_s", 90.5),
    ("DATAPROC_UPSTREAM_TIMEOUT_S", "2.5", "upstream_timeout_s", 2.5),
    ("DATAPROC_UPSTREAM_MAX_BYTES", "1024", "upstream_max_bytes", 1024),
    ("DATAPROC_POLL_INTERVAL_S", "30", "poll_interval_s", 30.0),
    ("DATAPROC_LOG_FORMAT", "JSON", "log_format", "json"),
    ("DATAPROC_LOG_LEVEL", "debug", "log_level", "DEBUG"),
    ("DATAPROC_METRICS", "off", "metrics_enabled", False),
    ("DATAPROC_MAX_CONNECTIONS", "100", "max_connections", 100),
    ("DATAPROC_THREADS", "12", "threads", 12),
    ("DATAPROC_LISTEN_BACKLOG", "2048", "listen_backlog", 2048),
    ("DATAPROC_SOCKET_TIMEOUT_S", "0.5", "socket_timeout_s", 0.5),
    ("DATAPROC_MAX_REQUEST_LINE_BYTES", "4096", "max_request_line_bytes", 4096),
    ("DATAPROC_MAX_HEADER_COUNT", "32", "max_header_count", 32),
    ("DATAPROC_MAX_HEADER_BYTES", "8192", "max_header_bytes", 8192),
    ("DATAPROC_MAX_BODY_BYTES", "1048576", "max_body_bytes", 1048576),
    ("DATAPROC_MAX_QUERY_PARAMS", "8", "max_query_params", 8),
    ("DATAPROC_DB_POOL_SIZE", "4", "db_pool_size", 4),
    ("DATAPROC_DB_WAIT_S", "1.5", "db_wait_s", 1.5),
    ("DATAPROC_MAX_EXPORTS", "3", "max_exports", 3),
    ("DATAPROC_DB_START_WAIT_S", "0", "db_start_wait_s", 0.0),
    ("DATAPROC_LOGIN_CONCURRENCY", "3", "login_concurrency", 3),
    ("DATAPROC_LOGIN_WAIT_S", "2", "login_wait_s", 2.0),
    ("DATAPROC_LOGIN_MAX_FAILURES", "7", "login_max_failures", 7),
    ("DATAPROC_LOGIN_WINDOW_S", "120", "login_window_s", 120.0),
    ("DATAPROC_SHUTDOWN_GRACE_S", "0", "shutdown_grace_s", 0.0),
    ("DATAPROC_PARTITION", "Week", "partition", "week"),
    ("DATAPROC_RETENTION", "90d", "retention_s", 90 * 86400.0),
    ("DATAPROC_READ_DATABASE_URL", " host=standby ", "read_database_url", "host=standby"),
    ("DATAPROC_CACHE", "false", "cache_enabled", False),
    ("DATAPROC_CACHE_MB", "256", "cache_mb", 256),
]

BAD = [  # (variable, bad value, words the message must contain)
    ("JWT_SECRET_KEY", "short", "32 bytes"),
    ("JWT_REFRESH_SECRET_KEY", "x" * 31, "32 bytes"),
    ("ACCESS_TOKEN_EXPIRE_MINUTES", "0", "between"),
    ("REFRESH_TOKEN_EXPIRE_MINUTES", "ten", "integer"),
    ("DATAPROC_HOST", "local host", "host"),
    ("DATAPROC_PORT", "65536", "between 0 and 65535"),
    ("DATAPROC_WORKERS", "0", "between 1 and 64"),
    ("DATAPROC_DATA_DIR", None, None),
    ("DATAPROC_BCRYPT_COST", "3", "between 4 and 16"),
    ("DATAPROC_PASSWORD_MIN_BYTES", "73", "between 1 and 72"),
    ("DATAPROC_INVALID_TAGS", None, None),
    ("DATAPROC_MAX_AGE_S", "-1", "between"),
    ("DATAPROC_UPSTREAM_TIMEOUT_S", "nan", "between"),
    ("DATAPROC_UPSTREAM_MAX_BYTES", "12", "between 64"),
    ("DATAPROC_POLL_INTERVAL_S", "soon", "number"),
    ("DATAPROC_LOG_FORMAT", "xml", "text, json"),
    ("DATAPROC_LOG_LEVEL", "LOUD", "DEBUG"),
    ("DATAPROC_METRICS", "maybe", "true or false"),
    ("DATAPROC_MAX_CONNECTIONS", "1.5", "integer"),
    ("DATAPROC_THREADS", "0", "between"),
    ("DATAPROC_LISTEN_BACKLOG", "0", "between"),
    ("DATAPROC_SOCKET_TIMEOUT_S", "0", "between"),
    ("DATAPROC_MAX_REQUEST_LINE_BYTES", "100", "between 256"),
    ("DATAPROC_MAX_HEADER_COUNT", "2", "between 4"),
    ("DATAPROC_MAX_HEADER_BYTES", "1e3", "integer"),
    ("DATAPROC_MAX_BODY_BYTES", "-5", "between"),
    ("DATAPROC_MAX_QUERY_PARAMS", "0x10", "integer"),
    ("DATAPROC_DB_POOL_SIZE", "0", "between"),
    ("DATAPROC_DB_WAIT_S", "inf", "between"),
    ("DATAPROC_MAX_EXPORTS", "0", "between"),
    ("DATAPROC_DB_START_WAIT_S", "-1", "between"),
    ("DATAPROC_LOGIN_CONCURRENCY", "257", "between"),
    ("DATAPROC_LOGIN_WAIT_S", "0", "between"),
    ("DATAPROC_LOGIN_MAX_FAILURES", "0", "between"),
    ("DATAPROC_LOGIN_WINDOW_S", "0.5", "between"),
    ("DATAPROC_SHUTDOWN_GRACE_S", "-1", "between"),
    ("DATAPROC_PARTITION", "hour", "one of"),
    ("DATAPROC_RETENTION", "90 days", "duration"),
    ("DATAPROC_READ_DATABASE_URL", "standby", "conninfo"),
    ("DATAPROC_CACHE", "sometimes", "true or false"),
    ("DATAPROC_CACHE_MB", "0", "between"),
]


def test_every_setting_has_a_parsing_case_and_a_bad_value_case():
    variables = [entry.variable for entry in SETTINGS]
    assert [row[0] for row in PARSED] == variables
    assert [row[0] for row in BAD] == variables


@pytest.mark.parametrize("variable, raw, field, expected", PARSED, ids=[row[0] for row in PARSED])
def test_each_variable_is_parsed_into_its_field(variable, raw, field, expected):
    assert getattr(env(**{variable: raw}), field) == expected


@pytest.mark.parametrize(
    "variable, bad, words", [row for row in BAD if row[1]], ids=[row[0] for row in BAD if row[1]]
)
def test_a_bad_value_is_refused_naming_the_variable(variable, bad, words):
    message = refused(**{variable: bad})
    assert message.startswith(f"{variable}: ")
    if words:
        assert words in message


@pytest.mark.parametrize("raw", ["1", "true", "YES", "on"])
def test_metrics_accepts_the_usual_spellings_of_true(raw):
    assert env(DATAPROC_METRICS=raw).metrics_enabled is True


@pytest.mark.parametrize("digits", ["１２", "٣", "8０80"])
def test_an_integer_setting_refuses_non_ascii_digits(digits):
    assert int(digits)  # Python reads them, so only the ASCII pattern keeps them out
    assert refused(DATAPROC_PORT=digits).startswith("DATAPROC_PORT: expected an integer")


def test_the_test_database_name_is_accepted_for_compatibility_and_unused():
    assert env(POSTGRES_TEST_DB_NAME="tests") == Config()


def test_an_empty_invalid_tag_list_means_no_invalid_tags():
    assert env(DATAPROC_INVALID_TAGS=" , ").invalid_tags == ()


# --- the database ---------------------------------------------------------------------------


def test_postgres_variables_become_a_conninfo_string():
    config = env(
        POSTGRES_SERVER="db.internal:5433",
        POSTGRES_USER="app",
        POSTGRES_PASSWORD="s3cret",
        POSTGRES_DB_NAME="points",
    )
    assert config.database_url == (
        "host='db.internal' port='5433' user='app' password='s3cret' dbname='points'"
    )


def test_a_postgres_server_without_a_port_leaves_the_port_to_libpq():
    config = env(POSTGRES_SERVER="db", POSTGRES_DB_NAME="points")
    assert conninfo_to_dict(config.database_url) == {"host": "db", "dbname": "points"}


def test_a_password_with_spaces_quotes_and_backslashes_survives_quoting():
    password = 'it\'s a "pass" \\ word = x'
    config = env(
        POSTGRES_SERVER="db:5432",
        POSTGRES_USER="app",
        POSTGRES_PASSWORD=password,
        POSTGRES_DB_NAME="points",
    )
    assert conninfo_to_dict(config.database_url) == {
        "host": "db",
        "port": "5432",
        "user": "app",
        "password": password,
        "dbname": "points",
    }


@pytest.mark.parametrize(
    "server, host, port",
    [
        ("::1", "::1", None),
        ("[::1]:5433", "::1", "5433"),
        ("[fe80::1]", "fe80::1", None),
        ("10.0.0.5:6432", "10.0.0.5", "6432"),
    ],
)
def test_ipv6_and_ipv4_servers_are_split_correctly(server, host, port):
    parsed = conninfo_to_dict(env(POSTGRES_SERVER=server).database_url)
    assert parsed.get("host") == host and parsed.get("port") == port


def test_a_malformed_bracketed_server_is_refused():
    assert refused(POSTGRES_SERVER="[::1]x").startswith("POSTGRES_SERVER: ")


def test_postgres_user_without_a_server_is_refused_naming_both():
    message = refused(POSTGRES_USER="app", POSTGRES_PASSWORD="pw")
    assert message.startswith("POSTGRES_SERVER: ")
    assert all(name in message for name in ("POSTGRES_USER", "POSTGRES_PASSWORD", "DATABASE_URL"))


def test_database_url_wins_over_the_postgres_variables():
    config = env(
        DATABASE_URL=" postgresql://u@h/db ", POSTGRES_SERVER="other", POSTGRES_DB_NAME="x"
    )
    assert config.database_url == "postgresql://u@h/db"


# --- the upstream -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "values, url",
    [
        ({"SERVER_URL": "upstream", "SERVER_PORT": "28462"}, "http://upstream:28462/"),
        ({"SERVER_URL": "upstream"}, "http://upstream/"),
        ({"SERVER_URL": "upstream/", "SERVER_PORT": "80"}, "http://upstream:80/"),
        ({"SERVER_URL": "http://up.example:9000/point?x=1"}, "http://up.example:9000/point?x=1"),
        ({"SERVER_URL": "https://up.example/"}, "https://up.example/"),
    ],
    ids=["host-and-port", "host-only", "trailing-slash", "full-url", "https"],
)
def test_server_url_and_port_become_the_upstream_url(values, url):
    assert env(**values).upstream_url == url


@pytest.mark.parametrize(
    "values, variable",
    [
        ({"SERVER_PORT": "28462"}, "SERVER_URL"),
        ({"SERVER_URL": "upstream", "SERVER_PORT": "http"}, "SERVER_PORT"),
        ({"SERVER_URL": "upstream", "SERVER_PORT": "70000"}, "SERVER_PORT"),
        ({"SERVER_URL": "ftp://upstream/"}, "SERVER_URL"),
        ({"SERVER_URL": "file:///etc/passwd"}, "SERVER_URL"),
        ({"SERVER_URL": "http://upstream:99999/"}, "SERVER_URL"),
        ({"SERVER_URL": "http:///path"}, "SERVER_URL"),
    ],
    ids=[
        "port-alone",
        "port-not-a-number",
        "port-out-of-range",
        "ftp",
        "file",
        "bad-port",
        "no-host",
    ],
)
def test_a_bad_upstream_is_refused_naming_the_variable(values, variable):
    assert refused(**values).startswith(f"{variable}: ")


# --- tokens -------------------------------------------------------------------------------


def test_algorithm_hs256_is_accepted():
    assert env(ALGORITHM="HS256") == Config()


@pytest.mark.parametrize("algorithm", ["RS256", "none", "HS512", "hs256"])
def test_another_algorithm_is_refused_with_the_reason(algorithm):
    message = refused(ALGORITHM=algorithm)
    assert message.startswith("ALGORITHM: only HS256 is supported")
    assert repr(algorithm) in message and "RFC 8725" in message


def test_a_short_signing_key_is_refused_with_how_to_make_one():
    message = refused(JWT_SECRET_KEY="x" * 31, JWT_REFRESH_SECRET_KEY=KEY_B)
    assert message.startswith("JWT_SECRET_KEY: must be at least 32 bytes")
    assert "secrets.token_urlsafe" in message


def test_a_key_is_measured_in_utf8_bytes_not_characters():
    assert env(JWT_SECRET_KEY="\u00e9" * 16).jwt_secret_key == "\u00e9" * 16  # 32 bytes


def test_equal_access_and_refresh_keys_are_refused():
    message = refused(JWT_SECRET_KEY=KEY_A, JWT_REFRESH_SECRET_KEY=KEY_A)
    assert message.startswith("JWT_REFRESH_SECRET_KEY: must differ from JWT_SECRET_KEY")


def test_distinct_keys_are_kept():
    config = env(JWT_SECRET_KEY=KEY_A, JWT_REFRESH_SECRET_KEY=KEY_B)
    assert (config.jwt_secret_key, config.jwt_refresh_secret_key) == (KEY_A, KEY_B)


# --- .env ---------------------------------------------------------------------------------

DOTENV = """\
# the original service's settings
POSTGRES_SERVER=db:5432
export POSTGRES_USER=app

POSTGRES_PASSWORD="pa ss # not a comment"
POSTGRES_DB_NAME='points'   # a comment after quotes
   DATAPROC_PORT = 9000
DATAPROC_HOST=0.0.0.0 # trailing comment
DATAPROC_DATA_DIR=/srv/data#kept
SERVER_URL=
"""


def write(tmp_path, text: str) -> str:
    path = tmp_path / ".env"
    path.write_text(text, encoding="utf-8")
    return str(path)


def test_dotenv_lines_are_read_with_comments_export_and_quotes(tmp_path):
    assert read_dotenv(write(tmp_path, DOTENV)) == {
        "POSTGRES_SERVER": "db:5432",
        "POSTGRES_USER": "app",
        "POSTGRES_PASSWORD": "pa ss # not a comment",
        "POSTGRES_DB_NAME": "points",
        "DATAPROC_PORT": "9000",
        "DATAPROC_HOST": "0.0.0.0",
        "DATAPROC_DATA_DIR": "/srv/data#kept",
        "SERVER_URL": "",
    }


def test_from_env_reads_the_dotenv_file(tmp_path):
    config = from_env({}, dotenv_path=write(tmp_path, DOTENV))
    assert conninfo_to_dict(config.database_url) == {
        "host": "db",
        "port": "5432",
        "user": "app",
        "password": "pa ss # not a comment",
        "dbname": "points",
    }
    assert (config.port, config.host, config.upstream_url) == (9000, "0.0.0.0", None)


def test_the_environment_wins_over_the_dotenv_file(tmp_path):
    config = from_env(
        {"DATAPROC_PORT": "7000", "DATABASE_URL": "postgresql:///x"},
        dotenv_path=write(tmp_path, DOTENV),
    )
    assert (config.port, config.database_url) == (7000, "postgresql:///x")


def test_a_missing_dotenv_file_is_no_error(tmp_path):
    assert from_env({}, dotenv_path=str(tmp_path / "absent.env")) == Config()


@pytest.mark.parametrize(
    "line",
    ["this is not a setting", "1KEY=x", "KEY", 'KEY="open', "KEY='a' b"],
    ids=["words", "digit-first", "no-equals", "unterminated-quote", "text-after-quote"],
)
def test_a_malformed_dotenv_line_names_the_file_and_line(tmp_path, line):
    path = write(tmp_path, f"# header\nDATAPROC_PORT=1\n{line}\n")
    with pytest.raises(ConfigError) as caught:
        from_env({}, dotenv_path=path)
    assert str(caught.value).startswith(f"{path}:3: ")


def test_a_bad_value_in_the_dotenv_file_names_the_variable(tmp_path):
    with pytest.raises(ConfigError, match="^DATAPROC_PORT: "):
        from_env({}, dotenv_path=write(tmp_path, "DATAPROC_PORT=eighty\n"))


def test_an_undecodable_dotenv_file_is_refused_naming_the_file(tmp_path):
    path = tmp_path / ".env"
    path.write_bytes(b"KEY=\xff\xfe\n")
    with pytest.raises(ConfigError, match="cannot read"):
        read_dotenv(str(path))


# --- the schema is the one source ------------------------------------------------------------


def test_each_setting_is_one_field_and_its_written_default_reads_back_as_the_default():
    fields = {field.name for field in dataclasses.fields(Config)}
    assert {entry.field for entry in SETTINGS} == fields - {"database_url", "upstream_url"}
    assert len({entry.variable for entry in VARIABLES}) == len(VARIABLES)
    for entry in SETTINGS:
        assert entry.help and entry.parse is not None, entry.variable
        if entry.computed:  # worked out at start: nothing to write down
            assert entry.default_text == "", entry.variable
        else:
            assert entry.parse(entry.default_text) == entry.default, entry.variable
            assert env(**{entry.variable: entry.default_text}) == Config(), entry.variable


def readme_table() -> dict[str, tuple[str, str]]:
    """The README's configuration table: variable -> (default, unit)."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    section = text.split("\n## Configuration\n", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in section.splitlines():
        match = re.fullmatch(r"\| `([A-Z_]+)` \| (.*?) \| (.*?) \| .+ \|", line)
        if match:
            assert match[1] not in rows, f"{match[1]} twice in the README's table"
            rows[match[1]] = (match[2], match[3])
    return rows


def readme_row(entry) -> str:
    return f"| `{entry.variable}` | {entry.readme_default} | {entry.unit or '—'} | {entry.help} |"


def test_the_readme_table_lists_every_variable_with_its_default_and_nothing_else():
    rows = readme_table()
    missing = [readme_row(entry) for entry in VARIABLES if entry.variable not in rows]
    assert missing == [], "add these rows to the README's table:\n" + "\n".join(missing)
    assert sorted(set(rows) - {entry.variable for entry in VARIABLES}) == []
    for entry in VARIABLES:
        assert rows[entry.variable] == (entry.readme_default, entry.unit or "—"), readme_row(entry)
    assert list(rows) == [entry.variable for entry in VARIABLES], "keep the schema's order"


def test_env_example_lists_every_variable_and_every_setting_with_its_default():
    example = read_dotenv(str(REPO / ".env.example"))
    missing = [
        f"{entry.variable}={entry.default_text}"
        for entry in VARIABLES
        if entry.variable not in example
    ]
    assert missing == [], "add these lines to .env.example:\n" + "\n".join(missing)
    assert sorted(set(example) - {entry.variable for entry in VARIABLES}) == []
    for entry in SETTINGS:
        assert example[entry.variable] == entry.default_text, entry.variable
