"""What the command line of a resumed run would change in its configuration.

A resumed run keeps the configuration it started with (``scripts/train.py``), so a setting given
with ``resume=`` that differs from the run's own — ``obs_model=vae`` on an AEF run, ``seed=5``,
``exp=cpu`` on a default run — would silently be dropped; the script refuses it instead.
Repeating the run's own settings (its original command line with ``resume=`` appended) passes.

* A config group (``obs_model=vae``, ``exp=cpu``) is compared by the option chosen, with the
  choices the run recorded in its configuration (``hydra_choices``). Runs from before that record
  have their ``obs_model`` and ``agent`` choices read from ``obs_model.kind`` and ``agent.name``;
  for another group such a run did not record, the leaves the option changes against the
  defaults are compared instead.
* A key (``seed=5``, ``agent.lr.model=1e-4``) is compared leaf by leaf under it. A leaf the run
  does not have (a key added since it started) passes when the value is the current default.

The keys a resume may change (``RESUME_OVERRIDABLE`` in ``scripts/train.py``) are left out, also
where a group option sets them.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping

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


def resume_conflicts(
    overrides: Iterable[str],
    overridable: Iterable[str],
    composed: Mapping,
    composed_unresolved: Mapping,
    base: Mapping,
    base_unresolved: Mapping,
    choices: Mapping[str, str],
    run_conf: Mapping,
) -> list[tuple[str, object, object]]:
    """``(setting, value given, the run's value)`` for each setting the command line would change.

    Args:
        overrides: the command line's overrides (``key=value``, ``group=option``).
        overridable: keys a resume may change (skipped, also inside group options).
        composed, composed_unresolved: the configuration composed with every override, as
            plain containers, interpolations resolved and not.
        base, base_unresolved: the same composed without the overrides that are checked here.
        choices: the config-group choices of ``composed`` (:func:`group_choices`).
        run_conf: the resumed run's configuration.
    """
    overridable = set(overridable)
    ran_choices = run_group_choices(run_conf)
    new, ran, default = leaves(composed), leaves(run_conf), leaves(base)
    given, plain = leaves(composed_unresolved), leaves(base_unresolved)
    conflicts: list[tuple[str, object, object]] = []
    seen: set[str] = set()  # overrides checked
    named: set[str] = set()  # leaves reported
    for item in overrides:
        key = item.split("=", 1)[0].lstrip("+~")
        if key in overridable or key == "resume" or key in seen:
            continue
        seen.add(key)
        if key in choices and key in ran_choices:
            if choices[key] != ran_choices[key]:
                conflicts.append((key, choices[key], ran_choices[key]))
            continue
        if key in choices:  # a group the run did not record: what the option changes
            names = [
                k
                for k in given.keys() | plain.keys()
                if given.get(k, _MISSING) != plain.get(k, _MISSING)
            ]
        else:
            names = [k for k in new.keys() | ran.keys() if k == key or k.startswith(f"{key}.")]
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


def describe(conflicts: list[tuple[str, object, object]], shown: int = 6) -> str:
    """``seed=5 (the run's: 0), obs_model=vae (the run's: aef)``, at most ``shown`` of them."""

    def text(value, missing: str) -> str:
        return (
            missing if value is _MISSING else repr(value) if not isinstance(value, str) else value
        )

    parts = [
        f"{key}={text(value, '(removed)')} (the run's: {text(old, 'not set')})"
        for key, value, old in conflicts[:shown]
    ]
    more = f" and {len(conflicts) - shown} more" if len(conflicts) > shown else ""
    return ", ".join(parts) + more
