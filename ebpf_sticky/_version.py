"""The one place the version is written; packaging (pyproject.toml) reads it from here."""

__version__ = "0.1.0"
