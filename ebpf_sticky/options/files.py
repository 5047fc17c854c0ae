"""Checks that read the files the options name; the master runs them before any worker starts."""

from __future__ import annotations

import importlib.util
import ssl
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from .model import WorkerOptions
from .table import NEEDS


def check_files(options: WorkerOptions) -> None:
    for choice in ("loop", "http", "ws"):
        module = NEEDS.get(options.config.get(choice, "auto"))
        if module is not None and importlib.util.find_spec(module) is None:
            raise ConfigError(
                f"--{choice} {options.config[choice]}: {module} is not installed (pip install {module})"
            )
    named = [("--env-file", options.env_file), ("--log-config", options.config.get("log_config"))]
    for flag, path in named:
        if path is not None and not Path(path).is_file():
            raise ConfigError(f"{flag} {path!r}: no such file")
    if options.app_dir is not None and not Path(options.app_dir).is_dir():
        raise ConfigError(f"--app-dir {options.app_dir!r}: no such directory")
    for directory in options.reload.dirs if options.reload else ():
        if not Path(directory).is_dir():
            raise ConfigError(f"--reload-dir {directory!r}: no such directory")
    check_tls(options.config)


def check_tls(config: dict[str, Any]) -> None:
    """Build the TLS context each worker will build, once, so a bad file, password, key, cipher or
    constant is one line before any worker starts instead of a crash loop in every slot."""
    certfile = config.get("ssl_certfile")
    if certfile is None:
        return
    keyfile = config.get("ssl_keyfile")
    for flag, path in (
        ("--ssl-certfile", certfile),
        ("--ssl-keyfile", keyfile),
        ("--ssl-ca-certs", config.get("ssl_ca_certs")),
    ):
        if path is not None and not Path(path).is_file():
            raise ConfigError(f"{flag} {path!r}: no such file")
    version = config.get("ssl_version", ssl.PROTOCOL_TLS_SERVER)
    try:
        context = ssl.SSLContext(version)
    except ValueError:
        raise ConfigError(
            f"--ssl-version {version}: not a protocol this ssl module has "
            f"(the default {ssl.PROTOCOL_TLS_SERVER} is PROTOCOL_TLS_SERVER)"
        ) from None
    password = config.get("ssl_keyfile_password")
    key = keyfile or certfile
    try:
        cert_text, key_text = Path(certfile).read_bytes(), Path(key).read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read {exc.filename!r}: {exc.strerror}") from None
    if b"-----BEGIN CERTIFICATE-----" not in cert_text:
        raise ConfigError(f"--ssl-certfile {certfile!r}: no PEM certificate in it")
    if b"PRIVATE KEY-----" not in key_text:
        raise ConfigError(f"--ssl-keyfile {key!r}: no PEM private key in it")
    encrypted = b"ENCRYPTED" in key_text
    if encrypted and password is None:
        raise ConfigError(f"--ssl-keyfile {key!r} is encrypted: give its --ssl-keyfile-password")
    try:
        # A password callback, even one returning "", stops OpenSSL from prompting on the terminal.
        context.load_cert_chain(certfile, keyfile, lambda: password or "")
    except ssl.SSLError as exc:
        if exc.reason == "KEY_VALUES_MISMATCH":
            raise ConfigError(
                f"--ssl-keyfile {key!r} is not the key of --ssl-certfile {certfile!r}"
            ) from None
        if encrypted:
            raise ConfigError(f"--ssl-keyfile-password does not decrypt {key!r}") from None
        raise ConfigError(f"cannot load --ssl-certfile {certfile!r} with its key {key!r}: {exc}") from None
    try:
        context.verify_mode = ssl.VerifyMode(config.get("ssl_cert_reqs", ssl.CERT_NONE))
    except ValueError:
        raise ConfigError(
            f"--ssl-cert-reqs {config['ssl_cert_reqs']}: expected 0 (none), 1 (optional) or 2 (required)"
        ) from None
    if config.get("ssl_ca_certs"):
        try:
            context.load_verify_locations(config["ssl_ca_certs"])
        except ssl.SSLError as exc:
            raise ConfigError(
                f"--ssl-ca-certs {config['ssl_ca_certs']!r}: no PEM certificate in it ({exc.reason})"
            ) from None
    if config.get("ssl_ciphers"):
        try:
            context.set_ciphers(config["ssl_ciphers"])
        except ssl.SSLError:
            raise ConfigError(
                f"--ssl-ciphers {config['ssl_ciphers']!r}: OpenSSL knows no cipher by it"
            ) from None
