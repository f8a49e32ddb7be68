"""The library's user-facing error: a bad configuration value, named by its config key."""


class ConfigError(ValueError):
    """A bad configuration value; the message names the key and how to fix it."""
