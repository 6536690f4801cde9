"""User-facing errors: each carries one line that names the bad key and the valid choices."""


class LowmemError(ValueError):
    """Bad input from the user (config, options, data). The CLI prints it as one line and exits 2."""


class StrategyError(LowmemError):
    """Unknown strategy or option, incompatible combination, or a strategy that matches no module."""


class ConfigError(LowmemError):
    """A config value the recipe, data or trainer cannot use (unknown choice, missing path, wrong type)."""


def one_line(exc: BaseException, limit: int = 300) -> str:
    """A third-party exception's message collapsed to one line (and cut at ``limit`` characters)."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."
