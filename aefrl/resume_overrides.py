"""What the command line of a resumed run would change in its configuration.

A resumed run keeps the configuration it started with (``scripts/train.py``), so a setting given
with ``resume=`` that differs from the run's own — ``obs_model=vae`` on an AEF run, ``seed=5``,
``exp=cpu`` on a default run — would silently be dropped; the script refuses it instead.
Repeating the run's own settings (its original command line with ``resume=`` appended) passes.

* A config group (``obs_model=vae``, ``exp=cpu``) is compared by the option chosen, with the
  choices the run recorded in its configuration (``hydra_choices``). Runs from before that record
  have their ``obs_model`` and ``agent`` choices read from ``obs_model.kind`` and ``agent.name``;
  for another group such a run did not record (``exp``), the keys the option changes are compared
  instead, which cannot see a preset set back to its default (``exp=default`` on such a run).
* A key (``seed=5``, ``agent.lr.model=1e-4``, ``loop={eval_every: 0}``) is compared leaf by leaf
  under the keys it names. A leaf the run does not have (a key added since it started) passes
  when the value is the current default.

The keys a resume may change (``RESUME_OVERRIDABLE`` in ``scripts/train.py``) are left out, also
where a group option sets them.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Iterable, Mapping

#: The run configuration's record of the config-group choices it was composed from.
CHOICES_KEY = "hydra_choices"
# Where a run from before CHOICES_KEY existed names its choice of these groups.
_CHOICE_IN_CONFIG = {"obs_model": ("obs_model", "kind"), "agent": ("agent", "name")}
_MISSING = object()


def leaves(node, prefix: str = "") -> dict:
    """``{dotted key: value}`` of the leaves of a nested mapping (lists count as leaves)."""
    if not isinstance(node, Mapping):
        return {prefix: node}
    out = {}
    for key, value in node.items():
        out.update(leaves(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


def group_choices(choices: Mapping) -> dict[str, str]:
    """The project's config-group choices from Hydra's ``runtime.choices`` (its own ``hydra/*``
    groups and unselected optional groups left out)."""
    return {str(g): str(c) for g, c in choices.items() if not str(g).startswith("hydra/") and c}


def run_group_choices(run_conf: Mapping) -> dict[str, str]:
    """The choices a run recorded, or, for a run from before the record, those its
    configuration names (``obs_model.kind``, ``agent.name``)."""
    if CHOICES_KEY in run_conf:
        return dict(run_conf[CHOICES_KEY])
    out = {}
    for group, (section, key) in _CHOICE_IN_CONFIG.items():
        value = (run_conf.get(section) or {}).get(key)
        if isinstance(value, str):
            out[group] = value
    return out


def _same(key: str, new, old) -> bool:
    if key == "run_dir" and isinstance(new, str) and isinstance(old, str):
        return os.path.normpath(new) == os.path.normpath(old)
    return new == old


def _parsed(override: str) -> tuple[str, object]:
    """``(key or group, value)`` of an override as Hydra parses it (the value ``None`` when it
    does not parse: such a command line stops before a resume is checked)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    try:
        parsed = OverridesParser.create().parse_override(override)
        return parsed.key_or_group, parsed.value()
    except (HydraException, ValueError):
        return override.split("=", 1)[0].lstrip("+~"), None


def typed_leaves(override: str) -> set[str]:
    """The dotted keys an override sets by name: ``seed=5`` -> ``{"seed"}``, ``loop={a: 1, b:
    2}`` -> ``{"loop.a", "loop.b"}``, ``loop={}`` -> none (a group choice names its group)."""
    key, value = _parsed(override)
    return set(leaves(value, key)) if isinstance(value, Mapping) else {key}


def overridable_given(overrides: Iterable[str], overridable: Iterable[str]) -> list[str]:
    """The keys of ``overridable`` that ``overrides`` set by name, also inside a dict value
    (``loop={total_frames: 600}``), in ``overridable``'s order."""
    typed = set().union(*(typed_leaves(o) for o in overrides))
    return [k for k in overridable if k in typed]


def changed_leaves(with_: Mapping, without: Mapping) -> set[str]:
    """Dotted keys whose value differs between two configurations (or that one lacks)."""
    a, b = leaves(with_), leaves(without)
    return {k for k in a.keys() | b.keys() if a.get(k, _MISSING) != b.get(k, _MISSING)}


def resume_conflicts(
    overrides: Iterable[str],
    overridable: Iterable[str],
    composed: Mapping,
    base: Mapping,
    choices: Mapping[str, str],
    run_conf: Mapping,
    effect: Callable[[str], Iterable[str]],
) -> list[tuple[str, object, object]]:
    """``(setting, value given, the run's value)`` for each setting the command line would change.

    Args:
        overrides: the command line's overrides (``key=value``, ``group=option``).
        overridable: keys a resume may change (skipped, also inside group options and dicts).
        composed: the configuration composed with every override (interpolations resolved).
        base: the same composed without ``overrides``: a key the run lacks (added since it
            started) passes at this default.
        choices: the config-group choices of ``composed`` (:func:`group_choices`).
        run_conf: the resumed run's configuration.
        effect: the dotted keys one override changes, for a group the run did not record
            (the configuration composed with every override against it without that one).
    """
    overridable = set(overridable)
    ran_choices = run_group_choices(run_conf)
    new, ran, default = leaves(composed), leaves(run_conf), leaves(base)
    conflicts: list[tuple[str, object, object]] = []
    named: set[str] = set()  # leaves reported
    for item in overrides:
        key, value = _parsed(item)
        if key == "resume":
            continue
        # A dict on a group's node (obs_model={kind: vae}) sets keys in it, like any dict.
        choice = key in choices and not isinstance(value, Mapping)
        if choice and key in ran_choices:
            if choices[key] != ran_choices[key] and key not in named:
                named.add(key)
                conflicts.append((key, choices[key], ran_choices[key]))
            continue
        if choice:  # a group the run did not record: the keys its option changes
            names = set(effect(item))
        else:
            names = {
                k for t in typed_leaves(item) for k in new.keys() | ran.keys()
                if k == t or k.startswith(f"{t}.")
            }  # fmt: skip
        for name in sorted(names):
            if name in overridable or name == CHOICES_KEY or name.startswith(f"{CHOICES_KEY}."):
                continue
            value, old = new.get(name, _MISSING), ran.get(name, _MISSING)
            if old is _MISSING and value == default.get(name, _MISSING):
                continue  # a key added since the run started, at its default
            if not _same(name, value, old) and name not in named:
                named.add(name)
                conflicts.append((name, value, old))
    return conflicts


def _spelled(value, missing: str) -> str:
    """A value as the command line spells it (``null``, ``true``, ``[1, 2]``)."""
    if value is _MISSING:
        return missing
    if isinstance(value, str):
        return value
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # inf, -inf, nan: json would write Infinity
    return json.dumps(value, default=str)


def describe(conflicts: list[tuple[str, object, object]], shown: int = 6) -> str:
    """``seed=5 (the run's: 0), obs_model=vae (the run's: aef)``, at most ``shown`` of them."""
    parts = [
        f"{key}={_spelled(value, '(removed)')} (the run's: {_spelled(old, 'not set')})"
        for key, value, old in conflicts[:shown]
    ]
    more = f" and {len(conflicts) - shown} more" if len(conflicts) > shown else ""
    return ", ".join(parts) + more


def command_line_conflicts(
    overrides: list[str],
    overridable: Iterable[str],
    cfg,
    compose: Callable[[list[str]], object],
    choices: Mapping[str, str],
    run_conf: Mapping,
) -> list[tuple[str, object, object]]:
    """:func:`resume_conflicts` of a Hydra command line: ``cfg`` is the configuration (a
    DictConfig) composed from ``overrides``, ``compose(overrides)`` composes another command
    line the same way, ``choices`` are ``cfg``'s config-group choices."""
    from hydra.errors import HydraException
    from omegaconf import OmegaConf

    overridable = list(overridable)
    checked = [o for o in overrides if _parsed(o)[0] not in overridable]
    if all(_parsed(o)[0] == "resume" for o in checked):
        return []
    base = compose([o for o in overrides if o not in checked])
    unresolved = OmegaConf.to_container(cfg, resolve=False)

    def effect(item: str) -> set[str]:
        try:
            without = compose([o for o in overrides if o != item])
        except HydraException:  # another override needs this one (a key only its option has)
            without = base  # then what all the checked overrides change together
        return changed_leaves(unresolved, OmegaConf.to_container(without, resolve=False))

    return resume_conflicts(
        checked,
        overridable,
        OmegaConf.to_container(cfg, resolve=True),
        OmegaConf.to_container(base, resolve=True),
        choices,
        run_conf,
        effect,
    )
