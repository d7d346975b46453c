"""Command-line overrides checked before Hydra runs the job: a misspelt key gets "did you mean"
(Hydra's own answer suggests `+key=`, which adds the misspelt key and fails later, in Lightning),
and a value of the wrong type is named at its key (`trainer.max_steps=abc` otherwise ends in a
traceback from inside the Trainer)."""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig, OmegaConf

from mtl_vision.cli import CONFIG_DIR
from mtl_vision.errors import closest


def _node_keys(cfg: DictConfig, path: str) -> list[str] | None:
    node = OmegaConf.select(cfg, path, default=None) if path else cfg
    return [str(k) for k in node.keys()] if isinstance(node, DictConfig) else None


def _raw(cfg: DictConfig, key: str) -> Any:
    """The value at `key` as written (interpolations are not resolved); `...` when absent."""
    parent, _, leaf = key.rpartition(".")
    node = OmegaConf.select(cfg, parent, default=None) if parent else cfg
    if not isinstance(node, DictConfig) or leaf not in list(node.keys()):
        return ...
    if OmegaConf.is_missing(node, leaf) or OmegaConf.is_interpolation(node, leaf):
        return None
    child = node._get_node(leaf)
    return None if child is None else child._value()


def _type_error(key: str, old: Any, new: Any) -> str | None:
    if old is None or new is None or isinstance(old, str) or OmegaConf.is_config(old):
        return None
    if isinstance(old, bool):
        return None if isinstance(new, bool) else f"{key}={new!r}: expected true or false"
    if isinstance(old, int):
        return None if isinstance(new, int) and not isinstance(new, bool) else f"{key}={new!r}: expected an integer"
    if isinstance(old, float):
        ok = isinstance(new, (int, float)) and not isinstance(new, bool)
        return None if ok else f"{key}={new!r}: expected a number"
    return None


def _value_error(key: str, new: Any) -> str | None:
    """The message of a key whose values are a fixed set (e.g. `eval.protocol`) for a value outside it."""
    from mtl_vision.metrics.protocols import check_protocol

    checks = {"eval.protocol": check_protocol}
    if key not in checks or new is None:
        return None
    try:
        checks[key](new, where=key)
    except ValueError as err:
        return str(err)
    return None


# Hydra's flags that take the next argument as their value
VALUE_FLAGS = {"--cfg", "-c", "--package", "-p", "--config-path", "-cp", "--config-name", "-cn", "--config-dir", "-cd",
               "--experimental-rerun"}  # fmt: skip


def override_args(args: list[str]) -> list[str]:
    """The `key=value` arguments of a Hydra command line, without its flags and their values."""
    kept, skip = [], False
    for arg in args:
        if skip:
            skip = False
        elif arg.startswith("-"):
            skip = arg in VALUE_FLAGS
        else:
            kept.append(arg)
    return kept


def _unknown_options(override: Any) -> list[str]:
    """`group=option` naming no `conf/<group>/<option>.yaml` (each value of a sweep checked)."""
    group = override.key_or_group
    try:
        chosen = list(override.sweep_string_iterator()) if override.is_sweep_override() else [override.value()]
    except Exception:
        return []
    options = sorted(p.stem for p in (CONFIG_DIR / group).glob("*.yaml"))
    found = []
    for option in chosen:
        if option is None or not isinstance(option, str) or (CONFIG_DIR / group / f"{option}.yaml").is_file():
            continue
        close = closest(option, options, cutoff=0.5)
        hint = f"did you mean {group}={close}? " if close else ""
        found.append(f"{group}={option}: no such option; {hint}(options: {', '.join(options)})")
    return found


def problems(config_name: str, args: list[str]) -> list[str]:
    """What is wrong with the `key=value` overrides in `args` against the config they change."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import OverrideType

    try:
        overrides = OverridesParser.create().parse_overrides(override_args(args))
    except Exception:  # a syntax error: Hydra reports it itself
        return []
    groups, values, found = [], [], []
    for override in overrides:
        key = override.key_or_group
        # hydra/<group> options also come from installed plugins (submitit, optuna): Hydra checks those
        if (CONFIG_DIR / key).is_dir() and not key.startswith("hydra") and override.type != OverrideType.DEL:
            found += _unknown_options(override)
        if (CONFIG_DIR / key).is_dir() or key.startswith("hydra"):
            groups.append(override.input_line)
        elif override.type == OverrideType.CHANGE and not override.is_sweep_override():
            values.append(override)
    if found or not values:
        return found
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
            base = compose(config_name=config_name, overrides=groups)
    except Exception:  # an unknown group option or the like: Hydra's own message names it
        return []
    finally:
        GlobalHydra.instance().clear()
    for override in values:
        key = override.key_or_group
        old = _raw(base, key)
        if old is ...:
            parent, _, leaf = key.rpartition(".")
            siblings = _node_keys(base, parent)
            if siblings is None:
                found.append(f"{key}: there is no {parent!r} in the config")
                continue
            close = closest(leaf, siblings)
            if close:
                hint = f"did you mean {'.'.join(filter(None, [parent, close]))}?"
            else:
                hint = f"{parent or 'the config'} has {siblings}"
            found.append(f"{key}: no such key; {hint} (+{key}=... adds a new key)")
            continue
        try:
            new = override.value()
        except Exception:
            continue
        message = _type_error(key, old, new)
        if message:
            found.append(f"{message} (the default is {old!r})")
        message = _value_error(key, new)
        if message:
            found.append(message)
    return found


def check_overrides(config_name: str, args: list[str]) -> None:
    """Exit with one line per problem when the overrides in `args` do not fit the config."""
    import sys

    if any(a in ("--help", "-h", "--hydra-help", "--info", "--shell-completion", "-sc") for a in args):
        return
    found = problems(config_name, args)
    if found:
        for line in found:
            print(f"error: {line}", file=sys.stderr)
        raise SystemExit(1)
