"""``lowmem-train``: the Hydra command line.

Before Hydra creates any output, the overrides are composed against the real config tree (every value of
a sweep too), the strategies and the recipe are built, and any bad input ends as one line naming the bad
key and the valid choices, with exit status 2. Errors found later (a strategy that matches no module, a
missing data root) also print one line, and the run's half-written directory is removed.
"""

from __future__ import annotations

import shutil
import sys
from importlib.resources import files
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from .errors import ConfigError, LowmemError, one_line
from .training import train, validate_config

CONFIG_DIR = Path(str(files("lowmem_train.configs")))
CONFIG_NAME = "train"
# What a failed run may have written into its run directory; only these are removed.
RUN_OUTPUTS = ("memory.csv", "memory_report.json", "memory_curve.png", "strategies.json", "csv", "wandb", ".hydra",
               "lowmem-train.log")


def config_groups() -> dict[str, list[str]]:
    return {d.name: sorted(f.stem for f in d.glob("*.yaml")) for d in CONFIG_DIR.iterdir() if d.is_dir()
            and any(d.glob("*.yaml"))}


def override_values(override) -> list[str]:
    if override.is_sweep_override():
        return list(override.sweep_string_iterator())
    value = override.value()
    return [str(v) for v in value] if isinstance(value, list) else [str(value)]


def candidate_overrides(parsed) -> list[list[str]]:
    """Override lists that cover every value of every sweep: one composition per value, not the product."""
    def setting(override, value):
        return f"{override.get_key_element()}={value}"

    base = [setting(o, override_values(o)[0]) if o.is_sweep_override() else o.input_line for o in parsed]
    combos = [base]
    for i, override in enumerate(parsed):
        if override.is_sweep_override():
            combos += [base[:i] + [setting(override, v)] + base[i + 1:] for v in override_values(override)[1:]]
    return combos


def check_overrides(args: list[str]) -> None:
    """Raise LowmemError (one line) for anything in ``args`` the config tree or the strategies reject."""
    try:
        parsed = OverridesParser.create().parse_overrides([a for a in args if not a.startswith("-")])
    except HydraException as exc:
        raise ConfigError(f"cannot parse overrides: {one_line(exc)}") from None
    groups = config_groups()
    for override in parsed:
        choices = groups.get(override.key_or_group)
        if choices is None or override.is_delete():
            continue
        for value in override_values(override):
            if value not in choices:
                raise ConfigError(f"unknown {override.key_or_group} '{value}'; valid choices: {', '.join(choices)}")
    for combo in candidate_overrides(parsed):
        validate_config(compose(combo))


def compose(overrides: list[str]) -> DictConfig:
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        try:
            return hydra_compose(CONFIG_NAME, overrides=[o for o in overrides if not o.startswith("hydra")])
        except (HydraException, OmegaConfBaseException) as exc:
            raise ConfigError(explain_composition_error(exc, overrides)) from None


def explain_composition_error(exc: Exception, overrides: list[str]) -> str:
    message = str(exc)
    if "Could not override" in message or "not in struct" in message:
        key = message.split("'")[1]
        parent, _, leaf = key.rpartition(".")
        remaining = [o for o in overrides if not o.lstrip("+~").startswith(key + "=") and not o.startswith("hydra")]
        try:
            from hydra import compose as hydra_compose

            root = hydra_compose(CONFIG_NAME, overrides=remaining)
            node = OmegaConf.select(root, parent) if parent else root
        except (HydraException, OmegaConfBaseException):
            node = None
        valid = ", ".join(k for k in node.keys() if k != "hydra") if isinstance(node, DictConfig) else "see README"
        return f"unknown option '{key}'; valid keys under {parent or 'the top level'}: {valid}"
    return one_line(exc)


def remove_run_outputs(run_dir: Path) -> None:
    for name in RUN_OUTPUTS:
        path = run_dir / name
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        elif path.exists():
            path.unlink()
    if run_dir.is_dir() and not any(run_dir.iterdir()):
        run_dir.rmdir()


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name=CONFIG_NAME)
def run(cfg: DictConfig) -> None:
    try:
        train(cfg)
    except LowmemError as exc:
        print(f"lowmem-train: error: {exc}", file=sys.stderr)
        remove_run_outputs(Path(HydraConfig.get().runtime.output_dir))
        sys.exit(2)


def main() -> None:
    try:
        check_overrides(sys.argv[1:])
    except LowmemError as exc:
        print(f"lowmem-train: error: {exc}", file=sys.stderr)
        sys.exit(2)
    run()
