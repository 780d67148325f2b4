"""Config loading: PgBouncer's ini format, errors that name file, line and key."""

import subprocess
import sys
import textwrap

import pytest

from pooler import config


def write(tmp_path, text, name="gateway.ini"):
    p = tmp_path / name
    p.write_text(textwrap.dedent(text))
    return p


def test_pgbouncer_ini_works_unchanged(tmp_path):
    write(tmp_path, '"alice" "md5f7e3b1e8f8d2b0b1e0c0a9d8e7f6a5b4"\n"bob" "SCRAM-SHA-256$4096:c2FsdA==$c3RvcmVk:c2VydmVy"\n', "userlist.txt")
    p = write(tmp_path, """\
        ;; a stock pgbouncer.ini
        [databases]
        shop = host=127.0.0.1 port=5433 dbname=shopdb user=app password='it''s secret' pool_size=7 pool_mode=session
        * = host=/var/run/postgresql

        [pgbouncer]
        listen_addr = 127.0.0.1
        listen_port = 6433
        auth_type = md5
        auth_file = userlist.txt
        pool_mode = transaction
        default_pool_size = 12
        max_client_conn = 500
        server_reset_query = DISCARD ALL
        query_wait_timeout = 30
        admin_users = postgres
        stats_users = stats
        dns_max_ttl = 15

        [users]
        alice = pool_mode=statement max_user_connections=3 groups=agents,readers
        """)
    cfg = config.load(p)
    assert cfg.listen_port == 6433 and cfg.pool_mode == "transaction"
    assert cfg.default_pool_size == 12 and cfg.max_client_conn == 500 and cfg.query_wait_timeout == 30
    shop = cfg.databases["shop"]
    assert (shop.host, shop.port, shop.dbname, shop.user, shop.password) == ("127.0.0.1", 5433, "shopdb", "app", "it's secret")
    assert shop.pool_size == 7 and shop.pool_mode == "session"
    assert cfg.auth_users["alice"].startswith("md5") and cfg.auth_users["bob"].startswith("SCRAM-SHA-256$")
    assert cfg.users["alice"].groups == ("agents", "readers")
    assert cfg.pool_mode_for(shop, "alice") == "statement"
    assert cfg.pool_mode_for(shop, "bob") == "session"
    other = cfg.database("anything")  # the "*" fallback connects to the same-named database
    assert other.dbname == "anything" and other.host == "/var/run/postgresql"
    assert (cfg.admin_users, cfg.stats_users) == (("postgres",), ("stats",))  # the admin console's
    # PgBouncer settings we do not implement are accepted with a warning naming the line
    assert any("dns_max_ttl" in w and ":18:" in w for w in cfg.warnings)


def test_unknown_key_is_a_warning_with_file_line_and_key(tmp_path):
    p = write(tmp_path, """\
        [gateway]
        auth_type = trust
        frobnicate = 1
        """)
    cfg = config.load(p)
    assert f"{p}:3: unknown setting frobnicate ignored" in cfg.warnings


@pytest.mark.parametrize("line,needle", [
    ("listen_port = sixty", "listen_port"),
    ("pool_mode = party", "pool_mode"),
    ("default_pool_size = -1", "default_pool_size"),
    ("query_wait_timeout = soon", "query_wait_timeout"),
    ("log_connections = maybe", "log_connections"),
])
def test_bad_value_is_an_error_naming_file_line_and_key(tmp_path, line, needle):
    p = write(tmp_path, f"[gateway]\nauth_type = trust\n{line}\n")
    with pytest.raises(config.ConfigError) as e:
        config.load(p)
    assert f"{p}:3:" in str(e.value) and needle in str(e.value)


def test_bad_database_entry_names_the_line(tmp_path):
    p = write(tmp_path, "[gateway]\nauth_type = trust\n[databases]\nshop = host=x port=notaport\n")
    with pytest.raises(config.ConfigError) as e:
        config.load(p)
    assert f"{p}:4:" in str(e.value) and "port" in str(e.value)


def test_missing_settings_section_and_missing_auth_file(tmp_path):
    with pytest.raises(config.ConfigError, match="no \\[gateway\\]"):
        config.load(write(tmp_path, "[databases]\nx = host=y\n"))
    with pytest.raises(config.ConfigError, match="needs auth_file"):
        config.load(write(tmp_path, "[gateway]\nauth_type = md5\n"))
    with pytest.raises(config.ConfigError, match="cannot read auth_file"):
        config.load(write(tmp_path, "[gateway]\nauth_type = md5\nauth_file = nope.txt\n"))


def test_garbage_line_is_an_error(tmp_path):
    p = write(tmp_path, "[gateway]\nthis is not a setting\n")
    with pytest.raises(config.ConfigError) as e:
        config.load(p)
    assert f"{p}:2:" in str(e.value)


def test_cli_exits_nonzero_with_the_line_on_a_broken_config(tmp_path):
    p = write(tmp_path, "[gateway]\nauth_type = trust\nlisten_port = 99999\n")
    r = subprocess.run([sys.executable, "-m", "pooler", "run", str(p)], capture_output=True, text=True, timeout=30)
    assert r.returncode != 0
    assert f"{p}:3:" in r.stderr and "listen_port" in r.stderr


def test_connstr_quoting():
    assert config.parse_connstr("a=1 b='x y' c='it''s' d='back\\\\slash'") == [
        ("a", "1"), ("b", "x y"), ("c", "it's"), ("d", "back\\slash")]
    with pytest.raises(ValueError):
        config.parse_connstr("a='unterminated")


# ------------------------------------------------------------------ TLS, tokens, upstream secrets


@pytest.mark.parametrize("line,needle", [
    ("jwt_algorithms = RS256,none", "'none' is never accepted"),
    ("jwt_algorithms = RS257", "unknown algorithm"),
    ("client_tls_sslmode = sometimes", "client_tls_sslmode"),
    ("client_tls_protocols = sslv3", "unknown TLS protocol"),
    ("jwt_expiry_action = shrug", "jwt_expiry_action"),
])
def test_bad_tls_and_token_values_name_the_line(tmp_path, line, needle):
    p = write(tmp_path, f"[gateway]\nauth_type = trust\n{line}\n")
    with pytest.raises(config.ConfigError) as e:
        config.load(p)
    assert f"{p}:3:" in str(e.value) and needle in str(e.value)


def test_jwt_needs_a_jwks_and_an_issuer_and_https(tmp_path):
    with pytest.raises(config.ConfigError, match="needs jwt_jwks"):
        config.load(write(tmp_path, "[gateway]\nauth_type = jwt\n"))
    with pytest.raises(config.ConfigError, match="not http://"):
        config.load(write(tmp_path, "[gateway]\nauth_type = jwt\njwt_jwks = http://idp/jwks\njwt_issuer = x\n"))
    with pytest.raises(config.ConfigError, match="needs jwt_issuer"):
        config.load(write(tmp_path, "[gateway]\nauth_type = trust\njwt_jwks = https://idp/jwks\n"
                                    "[databases]\nagents = host=h user=svc password=p auth_type=jwt\n"))
    with pytest.raises(config.ConfigError, match="needs jwt_audience"):
        config.load(write(tmp_path, "[gateway]\nauth_type = jwt\njwt_jwks = https://idp/jwks\njwt_issuer = x\n"))
    cfg = config.load(write(tmp_path, "[gateway]\nauth_type = trust\njwt_jwks = https://idp/jwks\njwt_issuer = x\n"
                                      "jwt_audience = *\n[users]\nbot = auth_type=jwt alias=reporter,etl\n"))
    assert cfg.users["bot"].auth_type == "jwt" and cfg.users["bot"].alias == ("reporter", "etl")
    assert any("jwt_audience = *" in w for w in cfg.warnings)
    assert config.jwt_settings(cfg).audience == ()  # `*`: any audience, explicitly
    assert any("only accepted over the Unix socket" in w for w in cfg.warnings)


def test_client_tls_needs_its_files_and_loads_them(tmp_path):
    from pooler.tls import make_self_signed

    with pytest.raises(config.ConfigError, match="needs client_tls_cert_file"):
        config.load(write(tmp_path, "[gateway]\nauth_type = trust\nclient_tls_sslmode = require\n"))
    with pytest.raises(config.ConfigError, match="client_tls_cert_file .*nope.crt: no such file"):
        config.load(write(tmp_path, "[gateway]\nauth_type = trust\nclient_tls_sslmode = require\n"
                                    "client_tls_cert_file = nope.crt\nclient_tls_key_file = nope.key\n"))
    make_self_signed(tmp_path / "gw.crt", tmp_path / "gw.key")
    cfg = config.load(write(tmp_path, "[gateway]\nauth_type = trust\nclient_tls_sslmode = require\n"
                                      "client_tls_cert_file = gw.crt\nclient_tls_key_file = gw.key\n"))
    assert cfg.client_ssl is not None and cfg.server_ssl is None


def test_upstream_secret_from_file_or_env_never_in_errors(tmp_path, monkeypatch):
    (tmp_path / "svc.secret").write_text("s3cret-from-file\n")
    monkeypatch.setenv("SVC_SECRET", "s3cret-from-env")
    cfg = config.load(write(tmp_path, "[gateway]\nauth_type = trust\n[databases]\n"
                                      "a = host=h user=svc password_file=svc.secret\n"
                                      "b = host=h user=svc password_env=SVC_SECRET\n"))
    assert cfg.databases["a"].password == "s3cret-from-file"
    assert cfg.databases["b"].password == "s3cret-from-env"
    with pytest.raises(config.ConfigError) as e:
        config.load(write(tmp_path, "[gateway]\nauth_type = trust\n[databases]\n"
                                    "a = host=h user=svc password=inline password_file=svc.secret\n"))
    assert ":4:" in str(e.value) and "only one of" in str(e.value)
    with pytest.raises(config.ConfigError, match="SVC_MISSING .* is not set"):
        config.load(write(tmp_path, "[gateway]\nauth_type = trust\n[databases]\na = host=h password_env=SVC_MISSING\n"))
    with pytest.raises(config.ConfigError) as e:
        config.load(write(tmp_path, "[gateway]\nauth_type = trust\n[databases]\na = host=h password_file=missing\n"))
    assert "cannot read password_file" in str(e.value) and "s3cret" not in str(e.value)


def test_a_token_only_database_is_not_weakened_by_a_user_entry(tmp_path):
    (tmp_path / "u.txt").write_text("\"bob\" \"pw\"\n")
    cfg = config.load(write(tmp_path, "[gateway]\nauth_type = scram-sha-256\nauth_file = u.txt\n"
                                      "jwt_jwks = https://idp/jwks\njwt_issuer = x\njwt_audience = gw\n"
                                      "[databases]\nagents = host=h user=svc password=p auth_type=jwt\nshop = host=h\n"
                                      "[users]\nalice = auth_type=trust\n"))
    assert cfg.auth_type_for(cfg.databases["agents"], "alice") == "jwt"
    assert cfg.auth_type_for(cfg.databases["shop"], "alice") == "trust"
    assert cfg.auth_type_for(cfg.databases["shop"], "bob") == "scram-sha-256"


def test_connstr_errors_never_quote_the_line(tmp_path):
    p = write(tmp_path, "[gateway]\nauth_type = trust\n[databases]\nshop = host=h password=abc!! secretword\n")
    with pytest.raises(config.ConfigError) as e:
        config.load(p)
    assert "secretword" not in str(e.value) and f"{p}:4:" in str(e.value)


def test_encrypted_tls_key_fails_fast_instead_of_prompting(tmp_path):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    from pooler.tls import make_self_signed

    make_self_signed(tmp_path / "gw.crt", tmp_path / "plain.key")
    key = serialization.load_pem_private_key((tmp_path / "plain.key").read_bytes(), None)
    (tmp_path / "gw.key").write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                        serialization.BestAvailableEncryption(b"pw")))
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    with pytest.raises(config.ConfigError, match="encrypted"):
        config.load(write(tmp_path, "[gateway]\nauth_type = trust\nclient_tls_sslmode = require\n"
                                    "client_tls_cert_file = gw.crt\nclient_tls_key_file = gw.key\n"))


def test_the_approvals_store_connection_string_becomes_client_arguments():
    assert config.store_connect_args("host=db port=5433 dbname=gw user=approvals password='p w' sslmode=require") == {
        "host": "db", "port": 5433, "database": "gw", "user": "approvals", "password": "p w", "ssl": "require"}
    assert config.store_connect_args("postgresql://a:b@db/gw") == {"dsn": "postgresql://a:b@db/gw"}
    with pytest.raises(ValueError, match="unsupported key 'target_session_attrs'"):
        config.store_connect_args("host=db target_session_attrs=any")
    with pytest.raises(ValueError, match="port must be a number"):
        config.store_connect_args("host=db port=x")
    with pytest.raises(ValueError) as e:
        config.store_connect_args("host=db password=s3cret oops")
    assert "s3cret" not in str(e.value)


@pytest.mark.parametrize("line", ["auth_hba_file = /etc/pgbouncer/hba.conf", "auth_ident_file = ident.map",
                                  "disable_pqexec = 1", "user = postgres"])
def test_pgbouncer_settings_that_would_weaken_access_are_refused(tmp_path, line):
    ini = tmp_path / "g.ini"
    ini.write_text(f"[databases]\nx = host=127.0.0.1\n[pgbouncer]\nauth_type = trust\n{line}\n")
    with pytest.raises(config.ConfigError, match=rf"g.ini:5: {line.split()[0]} is not supported: .*remove the setting"):
        config.load(ini)


def test_disable_pqexec_off_is_accepted(tmp_path):
    ini = tmp_path / "g.ini"
    ini.write_text("[databases]\nx = host=127.0.0.1\n[pgbouncer]\nauth_type = trust\ndisable_pqexec = 0\n")
    assert config.load(ini).databases["x"].host == "127.0.0.1"


def test_new_pgbouncer_keys_parse_with_errors_naming_file_line_key(tmp_path):
    ini = tmp_path / "g.ini"
    ini.write_text("[databases]\nx = host=a,b load_balance_hosts=disable reserve_pool=2 server_lifetime=0\n"
                   "[pgbouncer]\nauth_type = trust\nreserve_pool_size = 3\ntrack_extra_parameters = search_path\n"
                   "tcp_keepidle = 30\nso_reuseport = 1\nauth_user = pgb\n"
                   "[users]\nu = pool_size=4 transaction_timeout=5 allow_replication=1\n")
    cfg = config.load(ini)
    db, u = cfg.databases["x"], cfg.users["u"]
    assert (db.host, db.load_balance_hosts, db.reserve_pool_size, db.server_lifetime) == ("a,b", "disable", 2, 0.0)
    assert (cfg.reserve_pool_size, cfg.track_extra_parameters, cfg.tcp_keepidle, cfg.so_reuseport) == (3, ("search_path",), 30, True)
    assert (u.pool_size, u.transaction_timeout, u.allow_replication, cfg.auth_user) == (4, 5.0, True, "pgb")
    ini.write_text("[databases]\nx = host=a\n[pgbouncer]\nauth_type = trust\nreserve_pool_timeout = soon\n")
    with pytest.raises(config.ConfigError, match=r"g.ini:5: invalid value for reserve_pool_timeout"):
        config.load(ini)
    ini.write_text("[databases]\nx = host=a\n[pgbouncer]\nauth_type = trust\n[users]\nu = pool_size=-1\n")
    with pytest.raises(config.ConfigError, match=r"g.ini:6: user u: invalid pool_size: must not be negative"):
        config.load(ini)
    ini.write_text("[databases]\nx = host=a\n[pgbouncer]\nauth_type = trust\ntrack_extra_parameters = options\n")
    with pytest.raises(config.ConfigError, match=r"g.ini:5: invalid value for track_extra_parameters: options itself"):
        config.load(ini)
