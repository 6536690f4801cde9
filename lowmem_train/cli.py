"""``lowmem-train``: the Hydra command line.

Before Hydra creates any output, the overrides are composed against the real config tree (every value of
a sweep too), the strategies, the recipe, the optimizer and the Trainer are built, and any bad input ends
as one line naming the bad key and the valid choices, with exit status 2.

The run directory is claimed before Hydra writes into it: Hydra's default ``outputs/<date>/<time>`` gets a
``-1``, ``-2``... suffix when another run already has it, and an explicit ``hydra.run.dir`` /
``hydra.sweep.dir`` must be empty or new, and either must be writable. Everything in a claimed directory is
therefore this run's own: a run that fails on bad input removes its directory (only its own job's, in a
sweep) and nothing else. Any other exception prints one line pointing at the traceback in the run's log file
(``LOWMEM_DEBUG=1`` shows it on the terminal). A stopped run (Ctrl-C, SIGTERM, a non-finite loss) exits with
130, 143 or 3. In a sweep a job that fails or stops on a non-finite value is recorded (``failed.json``, a
row of ``sweep_summary.md``) and the next job runs; the sweep's exit status then says a job failed.
"""

from __future__ import annotations

import gc
import itertools
import logging
import os
import re
import shutil
import sys
import traceback
import warnings
from contextlib import nullcontext
from importlib.resources import files
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException
from hydra.types import RunMode
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from .config_store import register_configs
from .errors import ConfigError, LowmemError, one_line
from .run_control import EXIT_CODES as SIGNAL_EXIT_CODES
from .sweep import SUMMARY_FILE, failed_jobs, record_failure
from .training import train, trainer_parameters, validate_config
from .validation import schema_problem

CONFIG_DIR = Path(str(files("lowmem_train.configs")))
CONFIG_NAME = "train"
MULTI_CHOICE_GROUPS = ("strategy",)  # the other config groups take one choice each
# The directory this process claimed for its run (or sweep) and whether it created it.
claimed: dict[str, Path | bool] = {}
register_configs()  # the strategy options and group schemas, before anything composes (tests and scripts too)


def config_groups() -> dict[str, list[str]]:
    """Every config group and its choices, yaml files and ConfigStore schemas alike (Hydra's own listing)."""
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        loader = GlobalHydra.instance().config_loader()
        return {group: sorted(loader.get_group_options(group)) for group in loader.list_groups("") if group != "hydra"}


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


def check_overrides(overrides: list[str]) -> None:
    """Raise LowmemError (one line) for anything in ``overrides`` the config tree or the strategies reject."""
    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except HydraException as exc:
        raise ConfigError(f"cannot parse overrides: {one_line(exc)}") from None
    groups = config_groups()
    for override in parsed:
        group = override.key_or_group
        choices = groups.get(group)
        if choices is None or override.is_delete():
            continue
        if not override.is_sweep_override() and isinstance(override.value(), list):
            values = [str(v) for v in override.value()]
            if group not in MULTI_CHOICE_GROUPS:
                raise ConfigError(f"{group} takes one choice, got [{', '.join(values)}]; valid choices: "
                                  f"{', '.join(choices)}")
            twice = next((v for i, v in enumerate(values) if v in values[:i]), None)
            if twice is not None:
                raise ConfigError(f"strategy '{twice}' is listed twice in {group}=[{', '.join(values)}]; list it once")
        for value in override_values(override):
            if value not in choices:
                raise ConfigError(f"unknown {group} '{value}'; valid choices: {', '.join(choices)}")
    for combo in candidate_overrides(parsed):
        validate_config(compose(combo))


def with_trainer_keywords(args: list[str]) -> list[str]:
    """``trainer.K=V`` for every lightning.Trainer keyword K, also one the trainer configs do not list (which
    Hydra would only take as ``+trainer.K=V``)."""
    listed = set(OmegaConf.load(CONFIG_DIR / "trainer" / "default.yaml").keys())
    keywords = trainer_parameters()
    rewritten = []
    for arg in args:
        match = re.match(r"trainer\.(\w+)=", arg)
        rewritten.append(f"++{arg}" if match and match.group(1) in keywords and match.group(1) not in listed else arg)
    return rewritten


def with_estimate_switch(args: list[str]) -> list[str]:
    """``estimate=true|false`` as ``estimate.enabled=...``: the ``estimate`` node also holds ``estimate.device``
    and friends, and Hydra cannot set a node from a boolean."""
    return [f"estimate.enabled={arg.split('=', 1)[1]}" if re.fullmatch(r"\+*estimate=\w+", arg) else arg for arg in args]


def claim_output_dir(args: list[str], multirun: bool = False) -> list[str]:
    """Claim the run (or sweep) directory before Hydra writes into it; ``args`` with it set explicitly.

    An explicit directory must be empty or new. The default one (Hydra's ``outputs/<date>/<time>``) gets a
    numeric suffix when another run, maybe started in the same second, already has it. Either must be writable.
    """
    key = "hydra.sweep.dir" if multirun else "hydra.run.dir"
    given = [a for a in args if a.lstrip("+").startswith(key + "=")]
    if given:
        path = Path(resolve_now(given[-1].split("=", 1)[1].strip("'\"")))
        if path.exists() and not path.is_dir():
            raise ConfigError(f"{key}={path} is a file, not a directory; choose a new directory")
        if path.is_dir() and any(path.iterdir()):
            raise ConfigError(f"{key}={path} is not empty (an earlier run's files are there); choose a new directory: "
                              "lowmem-train never writes into another run's folder")
        created = make_run_dir(key, path, exist_ok=True)
    else:
        default = default_output_dir(key)
        for n in itertools.count():
            path = default if n == 0 else default.with_name(f"{default.name}-{n}")
            try:
                created = make_run_dir(key, path, exist_ok=False)
                break
            except FileExistsError:
                continue
    claimed.update(path=path.resolve(), created=[p.resolve() for p in created])
    return [a for a in args if a not in given] + [f"{key}='{path}'"]


def make_run_dir(key: str, path: Path, *, exist_ok: bool) -> list[Path]:
    """Create ``path`` and write a probe file into it, so a read-only place or a file on the way fails here as
    one line, not in Hydra as a traceback. Returns the directories it created, deepest first; raises
    FileExistsError when ``path`` is taken and not ``exist_ok`` (another run has it)."""
    new = [p for p in (path, *path.parents) if not p.exists()]
    try:
        path.mkdir(parents=True, exist_ok=exist_ok)
        probe = path / ".lowmem-train-write-check"
        probe.touch()
        probe.unlink()
    except OSError as exc:
        if isinstance(exc, FileExistsError) and not exist_ok and path.is_dir():
            raise
        remove_empty_dirs(new)
        raise ConfigError(f"{key}={path} cannot be written ({exc.strerror or one_line(exc)}: {exc.filename}); "
                          "choose a directory you can write to") from None
    return new


def remove_empty_dirs(paths: list[Path]) -> None:
    """Remove ``paths`` in order (deepest first) while they are empty: another run may have put its own in one."""
    for path in paths:
        try:
            path.rmdir()
        except FileNotFoundError:
            continue
        except OSError:
            return


def under_torchrun(args: list[str], multirun: bool) -> list[str]:
    """torchrun starts this command once per process, on every node: they must share one run directory,
    given explicitly (a shared file system across nodes), which rank 0 claims; the other ranks write no
    Hydra files of their own into it."""
    if "TORCHELASTIC_RUN_ID" not in os.environ or int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return args
    if multirun:
        raise ConfigError("-m (multirun) cannot run under torchrun: start one torchrun per job, or sweep with "
                          "hydra/launcher=slurm")
    if not any(a.lstrip("+").startswith("hydra.run.dir=") for a in args):
        raise ConfigError("under torchrun every process must write into one run directory: add "
                          "hydra.run.dir=<dir> (on a file system all nodes share)")
    if rank_zero_only.rank != 0:
        args = [*args, "hydra.output_subdir=null", "hydra/job_logging=disabled"]
    return args


def default_output_dir(key: str) -> Path:
    """Hydra's default run or sweep directory (``outputs/<date>/<time>``), resolved now."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        return Path(OmegaConf.select(hydra_compose(CONFIG_NAME, return_hydra_config=True), key))


def resolve_now(value: str) -> str:
    """A directory override with Hydra's ``${now:...}`` in it, resolved as Hydra would."""
    try:
        return str(OmegaConf.create({"value": value}).value)
    except OmegaConfBaseException:
        return value


def compose(overrides: list[str]) -> DictConfig:
    """The run config of ``overrides``, outside a Hydra app or inside one (``estimate.compare``'s rows)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    running = GlobalHydra.instance().is_initialized()
    with nullcontext() if running else initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        try:
            return hydra_compose(CONFIG_NAME, overrides=[o for o in overrides if not o.startswith("hydra")])
        except (HydraException, OmegaConfBaseException) as exc:
            raise ConfigError(explain_composition_error(exc, overrides)) from None


def explain_composition_error(exc: Exception, overrides: list[str]) -> str:
    """One line naming the bad key and what is valid: from the schema of a dataclass node (strategy options,
    data, model, optimizer), else from the composed config around the key (trainer, the top level)."""
    problem = schema_problem(exc)
    if problem is not None:
        return problem.message()
    message = str(exc)
    if "Could not override" in message or "not in struct" in message:
        key = message.split("'")[1]
        parent, _, leaf = key.rpartition(".")
        remaining = [o for o in overrides if not o.lstrip("+~").startswith(key + "=") and not o.startswith("hydra")]
        try:
            from hydra import compose as hydra_compose

            root = hydra_compose(CONFIG_NAME, overrides=remaining)
        except (HydraException, OmegaConfBaseException):
            return f"unknown option '{key}'; see README"
        node = OmegaConf.select(root, parent) if parent else root
        while not isinstance(node, DictConfig):  # strategy.none.x without strategy none: name strategy's keys
            parent = parent.rpartition(".")[0]
            node = OmegaConf.select(root, parent) if parent else root
        valid = ", ".join(k for k in node.keys() if k != "hydra")
        if parent == "trainer":
            valid = ", ".join(trainer_parameters())
        return f"unknown option '{key}'; valid keys under {parent or 'the top level'}: {valid}"
    cause = exc.__cause__
    if isinstance(cause, OmegaConfBaseException) and getattr(cause, "full_key", None):  # e.g. a list item
        return f"{cause.full_key}: {str(cause).splitlines()[0]}"
    return one_line(exc)


def remove_own_output(job_dir: Path) -> None:
    """After bad input: remove this job's directory, which lies in the directory this process claimed. A single
    run's is the claimed one: the parents the claim created go too, while empty (``outputs/<date>``); a
    sweep's job removes only its own (the sweep goes on)."""
    root = claimed.get("path")
    job_dir = job_dir.resolve()
    if root is None or not (job_dir == root or root in job_dir.parents):
        return
    if job_dir != root or claimed["created"]:
        shutil.rmtree(job_dir, ignore_errors=True)
        if job_dir == root:
            remove_empty_dirs(claimed["created"][1:])
        return
    for path in job_dir.iterdir():  # it was empty when claimed: everything in it is this run's
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name=CONFIG_NAME)
def run(cfg: DictConfig) -> None:
    hydra_cfg = HydraConfig.get()
    job_dir = Path(hydra_cfg.runtime.output_dir)
    try:
        report = train(cfg)
        gc.collect()  # what the run left in reference cycles (a trainer, a sharded model's groups) goes while the
        # interpreter is whole: freed at exit, gloo's threads can abort a finished torchrun job
    except LowmemError as exc:
        remove_own_output(job_dir)
        return end_job(hydra_cfg, "error", 2, str(exc))
    except Exception as exc:
        if os.environ.get("LOWMEM_DEBUG"):
            raise
        log = job_dir / f"{hydra_cfg.job.name}.log"
        with open(log, "a") as file:
            traceback.print_exc(file=file)
        return end_job(hydra_cfg, "error", 1, f"{type(exc).__name__}: {one_line(exc)} (traceback in {log}; "
                                              "LOWMEM_DEBUG=1 prints it)")
    stopped = (report or {}).get("stopped")
    if stopped:
        end_job(hydra_cfg, "stopped", stopped["exit_code"], f"{stopped['reason']}; report in {job_dir}; resume with "
                                                            f"ckpt_path={stopped['checkpoint']}")


def end_job(hydra_cfg, status: str, exit_code: int, message: str) -> None:
    """A run that failed or stopped: one line on stderr. A single run exits with ``exit_code``; a sweep's job
    records it in its folder (its row of ``sweep_summary.md``) and returns, so the next job runs. A signal
    (Ctrl-C, SIGTERM) ends the whole sweep."""
    if hydra_cfg.mode != RunMode.MULTIRUN or exit_code in SIGNAL_EXIT_CODES.values():
        print(f"lowmem-train: {status}: {message}", file=sys.stderr)
        sys.exit(exit_code)
    overrides = list(hydra_cfg.overrides.task)
    print(f"lowmem-train: {status}: job {hydra_cfg.job.num} ({' '.join(overrides)}): {message}", file=sys.stderr)
    record_failure(Path(hydra_cfg.runtime.output_dir), job=hydra_cfg.job.num, overrides=overrides, status=status,
                   exit_code=exit_code, message=message)


def exit_if_jobs_failed(sweep_dir: Path) -> None:
    """After a sweep: a non-zero exit when any job failed, the jobs' own status when they agree, else 1."""
    failed = failed_jobs(sweep_dir)
    if failed:
        codes = {f["exit_code"] for f in failed}
        print(f"lowmem-train: error: sweep job(s) {', '.join(str(f['job']) for f in failed)} failed; see "
              f"{sweep_dir / SUMMARY_FILE}", file=sys.stderr)
        sys.exit(codes.pop() if len(codes) == 1 else 1)


def quiet_third_party_noise() -> None:
    """Deprecation chatter of torch/Lightning internals, product tips and the hub's download bars are not the
    user's business here (the report says what ran)."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # read at import; transformers follows the hub
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    if "transformers" in sys.modules:  # imported already (an in-process call)
        sys.modules["transformers"].utils.logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", message=".*isinstance\\(treespec, LeafSpec\\).*")
    logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(  # the report names the device
        lambda record: not str(record.msg).startswith(("💡", "GPU available", "TPU available")))


def main() -> None:
    from hydra._internal.utils import get_args_parser  # Hydra's own flags (-m, --cfg job, ...) and overrides

    quiet_third_party_noise()
    if sys.argv[1:2] == ["export"]:  # lowmem-train export <run_dir> [--out DIR]: no Hydra run
        from .export import main as export_main

        sys.exit(export_main(sys.argv[2:]))
    args = with_estimate_switch(with_trainer_keywords(sys.argv[1:]))
    flags = get_args_parser().parse_args(args)
    runs = not (flags.cfg or flags.help or flags.hydra_help or flags.info or flags.shell_completion)
    try:
        if runs:
            args = under_torchrun(args, flags.multirun)
        check_overrides(flags.overrides)
        if runs and rank_zero_only.rank == 0:  # DDP workers reuse rank 0's directory
            args = claim_output_dir(args, flags.multirun)
    except LowmemError as exc:
        print(f"lowmem-train: error: {exc}", file=sys.stderr)
        sys.exit(2)
    sys.argv = sys.argv[:1] + args
    run()
    if flags.multirun and claimed.get("path"):
        exit_if_jobs_failed(claimed["path"])
