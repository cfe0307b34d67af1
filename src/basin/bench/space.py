"""Hyperparameter search spaces for :mod:`basin.bench.tune`: per-optimizer defaults, files.

A space maps a hyperparameter name to a distribution. ``name[i]`` addresses element ``i`` of a
tuple hyperparameter (``betas[1]``); the other elements keep their default. Distributions::

    {"type": "float", "low": 1e-5, "high": 1e-1, "log": true}        # log-uniform
    {"type": "float", "low": 0.8, "high": 0.99, "step": 0.01}        # uniform on a grid
    {"type": "float", "low": 1e-4, "high": 1e-1, "log": true, "one_minus": true}
                     # samples u log-uniformly and uses 1 - u (beta2 in [0.9, 0.9999])
    {"type": "int", "low": 1, "high": 8, "log": false, "step": 1}
    {"type": "categorical", "choices": [true, false]}
    {"type": "fixed", "value": 0.0}

A search-space file (JSON ``.json``, TOML ``.toml`` or YAML ``.yaml``/``.yml``) holds one such
mapping and replaces the optimizer's default space. Every mistake raises ``ValueError`` with
one line naming the file and the entry.
"""

from __future__ import annotations

import difflib
import inspect
import json
import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = [
    "Param",
    "default_space",
    "load_space",
    "parse_space",
    "space_to_dict",
]

_NAME = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)(?:\[(\d+)\])?$")
_KEYS = {
    "float": {"type", "low", "high", "log", "step", "one_minus"},
    "int": {"type", "low", "high", "log", "step"},
    "categorical": {"type", "choices"},
    "fixed": {"type", "value"},
}


class Param:
    """One entry of a search space (validated by :func:`parse_space`)."""

    def __init__(self, name: str, spec: dict[str, Any]) -> None:
        self.name = name
        self.spec = dict(spec)
        m = _NAME.match(name)
        assert m is not None
        self.base, idx = m.group(1), m.group(2)
        self.index = None if idx is None else int(idx)
        self.type = spec["type"]

    def sample(self, trial: Any) -> Any:
        s = self.spec
        if self.type == "float":
            v = trial.suggest_float(
                self.name, s["low"], s["high"], log=s.get("log", False), step=s.get("step")
            )
            return 1.0 - v if s.get("one_minus") else v
        if self.type == "int":
            return trial.suggest_int(
                self.name, s["low"], s["high"], log=s.get("log", False), step=s.get("step", 1)
            )
        if self.type == "categorical":
            return trial.suggest_categorical(self.name, s["choices"])
        return s["value"]

    def value_of(self, raw: Any) -> Any:
        """Hyperparameter value of a stored (sampled) parameter value."""
        if self.type == "float" and self.spec.get("one_minus"):
            return 1.0 - raw
        return raw

    def extremes(self) -> list[Any]:
        """Values at the ends of the range (to validate the space before running)."""
        s = self.spec
        if self.type in ("float", "int"):
            vals = [s["low"], s["high"]]
            return [1.0 - v for v in vals] if s.get("one_minus") else vals
        if self.type == "categorical":
            return list(s["choices"])
        return [s["value"]]


def default_space(optimizer: str) -> dict[str, Param]:
    """The default space of ``optimizer``: its registry entry's
    (:attr:`basin.optim.OptimInfo.search_space`; the learning rate alone for third-party
    optimizers basin knows nothing more about)."""
    from basin.optim import info

    raw = {k: dict(v) for k, v in info(optimizer).search_space.items()}
    return parse_space(raw, optimizer, source="default space")


def space_to_dict(space: Mapping[str, Param]) -> dict[str, dict[str, Any]]:
    return {name: dict(p.spec) for name, p in space.items()}


def _num(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _accepted(optimizer: str) -> tuple[set[str] | None, dict[str, Any]]:
    """Constructor keyword names of the optimizer (None: accepts **kwargs) and defaults."""
    from basin.optim import info

    entry = info(optimizer)
    # a training method's hyperparameters (saf's lam) are searchable like the optimizer's
    names, defaults = set(entry.method_defaults), dict(entry.method_defaults)
    try:
        sig = inspect.signature(entry.cls.__init__)
    except (TypeError, ValueError):
        return None, {}
    for p in list(sig.parameters.values())[1:]:
        if p.kind is p.VAR_KEYWORD:
            return None, defaults
        if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name != "params":
            names.add(p.name)
            if p.default is not p.empty:
                defaults[p.name] = p.default
    return names, defaults


def parse_space(raw: Any, optimizer: str, *, source: str = "search space") -> dict[str, Param]:
    """Validate a raw mapping (from a file or a registry entry) for ``optimizer``."""

    def bad(msg: str) -> ValueError:
        return ValueError(f"{source}: {msg}")

    if not isinstance(raw, Mapping):
        raise bad(f"expected a table of parameters, got {type(raw).__name__}")
    if not raw:
        raise bad("is empty; give at least one parameter")
    accepted, _ = _accepted(optimizer)
    out: dict[str, Param] = {}
    for name, spec in raw.items():
        where = f"parameter {name!r}"
        m = _NAME.match(str(name))
        if m is None:
            raise bad(f"{where}: not a hyperparameter name (use NAME or NAME[INDEX])")
        base = m.group(1)
        if accepted is not None and base not in accepted:
            close = difflib.get_close_matches(base, sorted(accepted), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise bad(
                f"unknown parameter {base!r} for {optimizer}{hint} "
                f"(accepted: {', '.join(sorted(accepted))})"
            )
        if not isinstance(spec, Mapping):
            raise bad(f"{where}: expected a table with a 'type', got {spec!r}")
        kind = spec.get("type")
        if kind not in _KEYS:
            raise bad(
                f"{where}: unknown distribution type {kind!r} (use float, int, categorical, fixed)"
            )
        extra = set(spec) - _KEYS[kind]
        if extra:
            raise bad(
                f"{where}: unknown key(s) {', '.join(sorted(map(str, extra)))} for type {kind!r} "
                f"(allowed: {', '.join(sorted(_KEYS[kind] - {'type'}))})"
            )
        spec = dict(spec)
        if kind in ("float", "int"):
            for k in ("low", "high"):
                if k not in spec:
                    raise bad(f"{where}: missing {k!r}")
                v = spec[k]
                if not _num(v) or (kind == "int" and not isinstance(v, int)):
                    want = "an integer" if kind == "int" else "a finite number"
                    raise bad(f"{where}: {k} must be {want}, got {v!r}")
            low, high = spec["low"], spec["high"]
            if low >= high:
                raise bad(
                    f"{where}: low ({low!r}) must be < high ({high!r}); "
                    "use type 'fixed' for a constant"
                )
            log = spec.get("log", False)
            if not isinstance(log, bool):
                raise bad(f"{where}: log must be true or false, got {log!r}")
            if log and low <= 0:
                raise bad(f"{where}: log scale needs low > 0, got low={low!r}")
            if "step" in spec:
                st = spec["step"]
                if not _num(st) or st <= 0 or (kind == "int" and not isinstance(st, int)):
                    raise bad(f"{where}: step must be a positive number, got {st!r}")
                if log:
                    raise bad(f"{where}: step and log cannot be combined")
            om = spec.get("one_minus", False)
            if not isinstance(om, bool):
                raise bad(f"{where}: one_minus must be true or false, got {om!r}")
            if kind == "float":
                spec["low"], spec["high"] = float(low), float(high)
                if om and not (0 <= low and high <= 1):
                    raise bad(f"{where}: one_minus needs 0 <= low < high <= 1")
        elif kind == "categorical":
            ch = spec.get("choices")
            if not isinstance(ch, list) or not ch:
                raise bad(f"{where}: choices must be a non-empty list, got {ch!r}")
            for c in ch:
                if c is not None and not isinstance(c, (bool, int, float, str)):
                    raise bad(f"{where}: choices must be numbers, strings or booleans, got {c!r}")
            if len({json.dumps(c) for c in ch}) != len(ch):
                raise bad(f"{where}: choices repeat a value")
        else:
            if "value" not in spec:
                raise bad(f"{where}: missing 'value'")
        p = Param(str(name), spec)
        out[p.name] = p
    for p in out.values():
        if p.index is None and any(q.base == p.base and q.index is not None for q in out.values()):
            raise bad(f"{p.base!r} is given both whole and by element")
    return out


class _DuplicateKey(ValueError):
    pass


def _unique_keys(pairs: list[tuple[Any, Any]], where: str = "") -> dict[Any, Any]:
    """A mapping from ``pairs`` that refuses a key given twice (JSON and YAML keep the last
    one silently, so a typo'd copy of an entry would win without a word)."""
    out: dict[Any, Any] = {}
    for k, v in pairs:
        if k in out:
            raise _DuplicateKey(f"key {k!r} is given twice{where}")
        out[k] = v
    return out


# YAML 1.1 (PyYAML) reads ``1e-4`` as a string: its float pattern wants a dot and a signed
# exponent. This resolver, the YAML 1.2 core schema's float pattern, reads it as a number.
_YAML_FLOAT = re.compile(
    r"""^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?
    |[-+]?\.(?:inf|Inf|INF)
    |\.(?:nan|NaN|NAN))$""",
    re.X,
)


def _yaml_loader(yaml: Any) -> Any:
    """PyYAML's SafeLoader with YAML 1.2 floats (``1e-4``) and duplicate keys refused."""

    class Loader(yaml.SafeLoader):
        pass

    Loader.yaml_implicit_resolvers = {
        k: [(tag, rx) for tag, rx in v if tag != "tag:yaml.org,2002:float"]
        for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()
    }
    Loader.add_implicit_resolver("tag:yaml.org,2002:float", _YAML_FLOAT, list("-+0123456789."))

    def mapping(loader: Any, node: Any, deep: bool = False) -> dict[Any, Any]:
        loader.flatten_mapping(node)
        out: dict[Any, Any] = {}
        for k, v in node.value:
            key = loader.construct_object(k, deep=deep)
            if key in out:
                raise _DuplicateKey(f"key {key!r} is given twice (line {k.start_mark.line + 1})")
            out[key] = loader.construct_object(v, deep=deep)
        return out

    Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, mapping)
    return Loader


def load_space(path: str | Path, optimizer: str) -> dict[str, Param]:
    """Read and validate a search-space file (``.json``, ``.toml``, ``.yaml``/``.yml``)."""
    p = Path(path)
    src = f"search space {str(p)!r}"
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ValueError(f"{src}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"{src}: cannot read: {getattr(exc, 'strerror', None) or exc}") from None
    suffix = p.suffix.lower()
    if suffix == ".json":
        try:
            raw = json.loads(text, object_pairs_hook=_unique_keys)
        except _DuplicateKey as exc:
            raise ValueError(f"{src}: invalid JSON: {exc}") from None
        except json.JSONDecodeError as exc:
            raise ValueError(
                f"{src}: invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}"
            ) from None
    elif suffix == ".toml":
        try:
            import tomllib
        except ImportError:  # Python 3.10
            try:
                import tomli as tomllib  # type: ignore[no-redef]
            except ImportError:
                raise ValueError(f"{src}: reading TOML needs Python 3.11+ or tomli") from None
        try:
            raw = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise ValueError(f"{src}: invalid TOML: {' '.join(str(exc).split())}") from None
    elif suffix in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:
            raise ValueError(f"{src}: reading YAML needs PyYAML (pip install pyyaml)") from None
        try:
            raw = yaml.load(text, Loader=_yaml_loader(yaml))  # noqa: S506 -- a SafeLoader
        except _DuplicateKey as exc:
            raise ValueError(f"{src}: invalid YAML: {exc}") from None
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            at = f" at line {mark.line + 1} column {mark.column + 1}" if mark else ""
            why = getattr(exc, "problem", None) or str(exc).splitlines()[0]
            raise ValueError(f"{src}: invalid YAML{at}: {why}") from None
    else:
        raise ValueError(
            f"{src}: unknown file type {suffix or '(none)'!r}; use .json, .toml or .yaml"
        )
    return parse_space(raw, optimizer, source=src)
