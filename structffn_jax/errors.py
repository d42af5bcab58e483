"""The project's error for a config value that cannot work.

A leaf module (it imports nothing), so that the schema, the data code and the sharding checks can
raise it without importing each other; `structffn_jax.config` re-exports it.
"""


class ConfigError(ValueError):
  """A config value that cannot work; the message names the field and the fix."""
