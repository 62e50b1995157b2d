"""Moved to `dsv3_jax.config_base` (shared by training, inference and the converter); this name stays so
that config files written against it keep working."""
from dsv3_jax.config_base import base_config

__all__ = ["base_config"]
