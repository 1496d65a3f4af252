"""Configs and the run schema: plain typed records, imported by every room."""

from schemas.errors import GapError
from schemas.config import Config, ConfigError, load_config
from schemas.run import VARIABLES, SampleRecord

__all__ = ["GapError", "Config", "ConfigError", "load_config", "VARIABLES", "SampleRecord"]
