"""The library's user-facing error: a bad configuration value, named by its config key."""


def one_line(e: BaseException) -> str:
    """An exception's message on one line (whitespace and line breaks collapsed), or its type's name."""
    return " ".join(str(e).split()) or type(e).__name__


class ConfigError(ValueError):
    """A bad configuration value; the message names the key and how to fix it."""
