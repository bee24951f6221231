"""All settings, from the environment with the LATENTD_ prefix (pydantic-settings).

One class for every process (API, worker, CLI) so a deployment documents one table.
`get_settings()` is cached; tests change the environment and call `get_settings.cache_clear()`.
"""
from __future__ import annotations

from functools import lru_cache

from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="LATENTD_", extra="ignore")

    # --- shared -----------------------------------------------------------------------------
    env: str = "prod"                      # "dev" relaxes the refuse-insecure-defaults checks
    redis_url: str = "redis://127.0.0.1:6379/0"
    model: str | None = None               # model folder / single file / hub id; None = bundled
    queue_name: str = "latentd"
    log_level: str = "info"

    # --- API (app/) -- section owned by the API work ----------------------------------------

    # --- worker (worker/) -- section owned by the worker work --------------------------------


@lru_cache
def get_settings() -> Settings:
    return Settings()
