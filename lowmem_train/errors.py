"""User-facing errors: each carries one line that names the bad key and the valid choices."""


class LowmemError(ValueError):
    """Bad input from the user (config, options, data). The CLI prints it as one line and exits 2."""


class StrategyError(LowmemError):
    """Unknown strategy or option, incompatible combination, or a strategy that matches no module."""


class ConfigError(LowmemError):
    """A config value the recipe, data or trainer cannot use (unknown choice, missing path, wrong type)."""


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message, for one-line reports of third-party errors."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
