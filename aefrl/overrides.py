"""Command-line overrides checked against ``configs/`` before Hydra runs the job.

Hydra answers a mistyped group choice (``obs_model=flow``) or key (``loop.total_frame=1``) with a
multi-line report and exit code 1, and takes a value of the wrong kind (``loop.total_frames=abc``)
without complaint, so that it fails deep inside the run as a ``TypeError``. :func:`check_overrides`
turns each of these into one sentence that says what was wrong and what is accepted; the scripts
print it and exit with code 2, like every other bad input.

Kinds follow the defaults: a key whose default is a number takes a number (int or float: ranges
and integrality are checked by the component that uses it, e.g. ``LoopConfig``), a boolean key
takes ``true`` / ``false``; string keys and keys without a default (``null``) take anything,
since their components validate them (``device``, ``loop.cuda_graph``, ``env.task``).
"""

from __future__ import annotations

import difflib
import itertools
from collections.abc import Callable
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Glob
from hydra.errors import HydraException, OverrideParseException
from omegaconf import OmegaConf
from tqdm import tqdm

from aefrl.resume_overrides import leaves

_ABSENT = object()


class OverrideError(ValueError):
    """A command-line override that does not fit ``configs/``; the message is one sentence."""


def config_groups(config_dir: Path) -> dict[str, list[str]]:
    """Top-level config groups and their choices: ``{"obs_model": ["aef", ...], ...}``."""
    return {
        d.name: sorted(f.stem for f in d.glob("*.yaml"))
        for d in sorted(Path(config_dir).iterdir())
        if d.is_dir()
    }


def _kind(value) -> str:
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int | float):
        return "number"
    return "other"


_KIND_WORDS = {"bool": "true or false", "number": "a number"}


def _choices_with_key(config_dir, config_name, parsed, groups, key) -> list[str]:
    """The choices of the group that ``key`` starts with (``obs_model``) whose composed
    configuration has ``key``: ``obs_model.options.proposal_scale`` is aef's only."""
    group = key.split(".", 1)[0]
    if group not in groups:
        return []
    others = [o.input_line for o in parsed if o.key_or_group in groups and o.key_or_group != group]
    owners = []
    with initialize_config_dir(str(config_dir), version_base="1.3"):
        for choice in groups[group]:
            try:
                cfg = compose(config_name, overrides=[*others, f"{group}={choice}"])
            except HydraException:
                continue
            found = OmegaConf.select(cfg, key, default=_ABSENT, throw_on_resolution_failure=False)
            if found is not _ABSENT:
                owners.append(choice)
    return owners


#: Hydra's flag for a sweep (several jobs); its other flags (--cfg, --help, ...) run no job.
MULTIRUN_FLAGS = ("-m", "--multirun")


def check_overrides(
    config_dir: Path, config_name: str, args: list[str], check_job: Callable | None = None
) -> None:
    """Raise :class:`OverrideError` if an override in ``args`` (``key=value`` items) names an
    unknown group choice or key, or gives a boolean or numeric key a value of another kind.

    With ``-m`` every value of every sweep (``seed=0,1``, ``obs_model=vae,aef``) is checked as
    a single run's override would be: a sweep skipped these checks, and ``agent.compile=no,yes``
    trained both jobs compiled (a non-empty string is true). ``check_job(composed, overrides)``
    (train.py's :func:`check_job`: settings the job never reads, values out of range) is called
    for each job of a new run with its composed configuration, before the first job starts;
    its ValueError becomes an :class:`OverrideError`.
    Command lines with Hydra's other flags (``--cfg job``, ``--help``: no job runs) and
    ``hydra.*`` keys are left to Hydra; a sweep without ``-m`` and a deletion (``~seed``) are
    refused, and so is a value for a whole group of settings (``loop=5``).
    """
    config_dir = Path(config_dir).resolve()
    flags = [a for a in args if a.startswith("-")]
    if any(f not in MULTIRUN_FLAGS for f in flags):
        return
    args = [a for a in args if not a.startswith("-")]
    parsed = _parse(args)
    if flags:
        try:
            groups = config_groups(config_dir)
            variants = _sweep_variants(parsed, groups)
        except _Unexpandable as exc:
            sweeper = [o.value() for o in parsed if o.key_or_group == "hydra/sweeper"]
            if sweeper and sweeper[-1] != "basic":
                return  # a sweeper plugin's sweep (interval for Optuna's): left to it
            raise _unexpandable_refusal(exc.args[0], groups) from None
        resumes = [o.value() for v in variants for o in _parse(v) if o.key_or_group == "resume"]
        if any(r is not None for r in resumes) and len(set(map(str, resumes))) < len(variants):
            raise OverrideError(  # job 0 trained on before job 1 was refused the same run
                "a -m sweep resumes the same run in several of its jobs; resume each job's "
                "run_dir on its own (or sweep resume=<dir>,<dir> alone)"
            )
        # ~0.15 s a job with train.py's checks: a bar, so that a large grid is not silent
        # None: tqdm's "only on a terminal" (in a log its lines would stay before an error)
        quiet = True if check_job is None or len(variants) < 2 else None
        with tqdm(
            variants, "checking the sweep's jobs", unit="job", leave=False, disable=quiet
        ) as bar:
            for variant in bar:  # closed (the line cleared) before an error is printed
                _check(config_dir, config_name, variant, _parse(variant), check_job)
        return
    _check(config_dir, config_name, args, parsed, check_job)


def _parse(args: list[str]) -> list:
    try:
        return OverridesParser.create().parse_overrides(list(args))
    except OverrideParseException as exc:
        first = str(exc).strip().splitlines()[0]
        raise OverrideError(f"cannot parse the command line {' '.join(args)!r}: {first}") from None


class _Unexpandable(Exception):  # noqa: N818 (not an error of its own: see check_overrides)
    """A sweep override Hydra's basic sweeper cannot expand; its argument is the override."""


def _unexpandable_refusal(o, groups: dict[str, list[str]]) -> OverrideError:
    """The refusal of a sweep override ``o`` Hydra's basic sweeper cannot expand."""
    if o.key_or_group.startswith("hydra"):
        return OverrideError(
            f"{o.input_line}: a sweep over Hydra's own configuration is not supported"
        )
    if isinstance(o.value(), Glob):  # Hydra would launch no job at all
        return OverrideError(
            f"{o.input_line}: glob(...) picks among a config group's options "
            f"({', '.join(sorted(groups))}), and {o.key_or_group} is not a group; give "
            "its values as a list (a,b,c) or range(...)"
        )
    return OverrideError(
        f"{o.input_line}: Hydra's basic sweeper, the one configured, cannot run this "
        "sweep (it runs lists of values, range(...) and glob(...) over a group); give "
        "the values as a list (a,b,c), or choose a sweeper plugin that runs it "
        "(hydra/sweeper=...)"
    )


def _sweep_variants(parsed: list, groups: dict[str, list[str]]) -> list[list[str]]:
    """The single-run command lines of a sweep's jobs, every combination of its values, as
    Hydra's basic sweeper runs them (a check can depend on several settings together). A
    ``glob(...)`` over a group's choices is expanded against ``groups``; :class:`_Unexpandable`
    names a sweep the basic sweeper cannot run (``interval(...)``)."""
    values = []
    for o in parsed:
        if not o.is_sweep_override():
            values.append([o.input_line])
            continue
        try:
            if isinstance(o.value(), Glob) and o.key_or_group in groups:
                swept = o.value().filter(groups[o.key_or_group])
            else:
                swept = list(o.sweep_string_iterator())
        except HydraException:
            raise _Unexpandable(o) from None
        values.append([f"{o.get_key_element()}={v}" for v in swept] or [o.input_line])
    return [list(job) for job in itertools.product(*values)]


def _check(
    config_dir: Path, config_name: str, args: list[str], parsed: list, check_job: Callable | None
) -> None:
    """:func:`check_overrides` of one single-run command line (no flags)."""
    # Hydra's own settings (hydra.run.dir=..., hydra/launcher=...); hydra_choices is ours
    hydra_own = ("hydra.", "hydra/")
    parsed = [
        o for o in parsed if o.key_or_group != "hydra" and not o.key_or_group.startswith(hydra_own)
    ]
    for o in parsed:
        if o.is_sweep_override():  # Hydra's "Ambiguous value" report is several lines
            raise OverrideError(
                f"{o.input_line} gives several values: a sweep needs -m (python scripts/train.py "
                f"-m {o.input_line}); a single run takes one value"
            )
        if o.is_delete():  # every key is read by the run: a deleted one fails as a KeyError
            raise OverrideError(
                f"{o.input_line} deletes a setting, which the run needs; set it instead "
                f"({o.key_or_group}=<value>)"
            )
    groups = config_groups(config_dir)
    for o in parsed:
        if o.key_or_group in groups and not o.is_delete() and o.package is None:
            choice, choices = o.value(), groups[o.key_or_group]
            if isinstance(choice, str) and choice not in choices:
                close = difflib.get_close_matches(choice, choices, n=1)
                hint = f"; did you mean {o.key_or_group}={close[0]}?" if close else ""
                raise OverrideError(
                    f"{o.input_line} is not a choice: {o.key_or_group} is one of "
                    f"{', '.join(choices)} (configs/{o.key_or_group}/){hint}"
                )
    # A mapping on a group's node (agent={lr: {model: 1e-4}}) sets keys in the chosen option.
    keyed = [o for o in parsed if o.key_or_group not in groups or isinstance(o.value(), dict)]
    group_lines = [o.input_line for o in parsed if o not in keyed]
    try:
        with initialize_config_dir(str(config_dir), version_base="1.3"):
            defaults = compose(config_name, overrides=group_lines, return_hydra_config=True)
    except HydraException as exc:
        raise OverrideError(" ".join(str(exc).split())) from None
    # A dict value (loop={total_frames: 600}) is checked key by key, as loop.total_frames=600:
    # Hydra answers an unknown key inside it with a multi-line report.
    pending = [(o.key_or_group, o.value(), o.is_add()) for o in keyed]
    while pending:
        key, value, is_add = pending.pop(0)
        default = OmegaConf.select(
            defaults, key, default=_ABSENT, throw_on_resolution_failure=False
        )
        if default is _ABSENT:
            owners = _choices_with_key(config_dir, config_name, parsed, groups, key)
            if owners:
                group = key.split(".", 1)[0]
                chosen = OmegaConf.select(defaults, f"hydra.runtime.choices.{group}")
                takes = "takes" if len(owners) == 1 else "take"
                raise OverrideError(
                    f"{key} is not a setting of {group}={chosen}: only "
                    f"{' and '.join(f'{group}={o}' for o in owners)} {takes} it"
                )
            if "/" in key and (config_dir / key).is_dir():  # agent/planner_exp: a nested group
                raise OverrideError(
                    f"{key} is chosen by the presets (configs/exp/), not on the command line: "
                    "choose exp=... instead"
                )
            tree = OmegaConf.to_container(defaults, resolve=False)  # interpolations unresolved
            settings = [k for k in leaves(tree) if not k.startswith("hydra.")]
            # Groups too: obs_modle=vae means the group obs_model, not its key obs_model.kind.
            close = difflib.get_close_matches(key, [*groups, *settings], n=1)
            hint = f"; did you mean {close[0]}?" if close else ""
            # "+key" adds a key; no component reads a key that configs/ lacks
            raise OverrideError(f"{key} is not a setting: no such key in configs/{hint}")
        if is_add:
            raise OverrideError(f"{key} is already a setting: write {key}=..., without the +")
        if OmegaConf.is_dict(default) and not isinstance(value, dict):
            raise OverrideError(
                f"{key} is a group of settings, not a value: set its keys ({key}.<key>=<value>), "
                f"got {value!r}"
            )
        if OmegaConf.is_dict(default):  # a dict for a group of settings: each key in it
            pending += [(f"{key}.{k}", v, False) for k, v in value.items()]
            continue
        want = _kind(default)
        if want in _KIND_WORDS and _kind(value) != want:
            words = _KIND_WORDS[want]
            raise OverrideError(f"{key} takes {words} (default {default}), got {value!r}")
    # A resume's settings are the run's own, which train.py compares the command line with.
    resumed = any(o.key_or_group == "resume" and o.value() is not None for o in parsed)
    if check_job is not None and not resumed:
        lines = [o.input_line for o in parsed]
        try:  # the job's whole configuration: every override, not only the group choices
            with initialize_config_dir(str(config_dir), version_base="1.3"):
                job = compose(config_name, overrides=lines)
        except HydraException as exc:
            raise OverrideError(" ".join(str(exc).split())) from None
        try:
            check_job(job, lines)
        except ValueError as exc:
            raise OverrideError(str(exc)) from None
