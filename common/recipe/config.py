"""Recipes: YAML files loaded into typed dataclasses (OmegaConf structured configs).

`load_recipe(Schema, "recontriever", ["train.lr=3e-5"])` finds `recipes/recontriever.yaml` (or takes
a path), follows its `base:` chain (a recipe may extend another one), applies dotted command-line
overrides, and returns a `Schema` instance. Every unknown key and every wrong type fails with a
`RecipeError` naming the key, where it came from, and the closest valid key.
"""
from __future__ import annotations

import dataclasses
import difflib
import os
from pathlib import Path
from typing import Any, TypeVar

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

T = TypeVar("T")
RECIPES_DIR = Path(__file__).resolve().parents[2] / "recipes"  # twotower/recipes when installed
BASE_KEY = "base"


class RecipeError(ValueError):
    """A recipe (or an override) that does not fit its schema."""


def recipe_dirs() -> list[Path]:
    """Where recipe names are looked up: $TWOTOWER_RECIPES (os.pathsep-separated), then recipes/."""
    extra = [Path(p) for p in os.environ.get("TWOTOWER_RECIPES", "").split(os.pathsep) if p]
    return extra + [RECIPES_DIR]


def find_recipe(name_or_path: str) -> Path:
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") and path.is_file():
        return path
    for folder in recipe_dirs():
        for candidate in (folder / f"{name_or_path}.yaml", folder / name_or_path):
            if candidate.is_file():
                return candidate
    known = sorted(p.stem for d in recipe_dirs() if d.is_dir() for p in d.glob("*.yaml"))
    close = difflib.get_close_matches(str(name_or_path), known, n=1)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    raise RecipeError(
        f"recipe '{name_or_path}' not found (looked for a .yaml path, then NAME.yaml in "
        f"{', '.join(str(d) for d in recipe_dirs())}).{hint} Known recipes: {', '.join(known)}"
    )


def _read_yaml_chain(path: Path, seen: tuple[Path, ...] = ()) -> list[tuple[Path, dict]]:
    """The recipe and its `base:` ancestors, oldest first."""
    if path.resolve() in seen:
        raise RecipeError(f"{path}: circular '{BASE_KEY}:' chain: {' -> '.join(map(str, seen))}")
    try:
        raw = OmegaConf.to_container(OmegaConf.load(path), resolve=False) or {}
    except Exception as exc:  # yaml.YAMLError and friends: name the file
        raise RecipeError(f"{path}: not a valid YAML recipe: {exc}") from exc
    if not isinstance(raw, dict):
        raise RecipeError(f"{path}: a recipe must be a mapping of sections, got {type(raw).__name__}")
    base = raw.pop(BASE_KEY, None)
    chain: list[tuple[Path, dict]] = []
    if base:
        base_path = Path(base) if Path(base).is_absolute() else path.parent / f"{base}.yaml"
        if not base_path.is_file():
            base_path = find_recipe(str(base))
        chain = _read_yaml_chain(base_path, seen + (path.resolve(),))
    return chain + [(path, raw)]


def _field_types(schema: Any) -> dict[str, Any]:
    return {f.name: f for f in dataclasses.fields(schema)}


def _check_keys(schema: Any, values: dict, origin: str, prefix: str = "") -> None:
    """Reject unknown keys with the closest valid one, recursing into nested dataclasses."""
    fields = _field_types(schema)
    for key, value in values.items():
        full = f"{prefix}{key}"
        if key not in fields:
            valid = [f"{prefix}{name}" for name in fields]
            close = difflib.get_close_matches(full, valid, n=1, cutoff=0.5)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise RecipeError(
                f"{origin}: unknown key '{full}'{hint} (valid keys here: {', '.join(valid)})"
            )
        ftype = fields[key].type
        nested = ftype if dataclasses.is_dataclass(ftype) else None
        if nested is None and isinstance(ftype, str):
            default = fields[key].default_factory  # type: ignore[misc]
            if default is not dataclasses.MISSING:
                probe = default()
                nested = type(probe) if dataclasses.is_dataclass(probe) else None
        if nested is not None:
            if not isinstance(value, dict):
                raise RecipeError(f"{origin}: '{full}' is a section; give it a mapping, not {value!r}")
            _check_keys(nested, value, origin, prefix=f"{full}.")


def _merge(cfg: Any, values: Any, origin: str) -> Any:
    try:
        return OmegaConf.merge(cfg, values)
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", None) or "?"
        msg = str(exc).splitlines()[0]
        raise RecipeError(f"{origin}: bad value for '{key}': {msg}") from exc


# (key, the key it replaces when non-zero): setting the replaced key in a later file or override
# than the replacing one would do nothing, silently -- refused instead (check_superseded)
SUPERSEDED = (("train.global_batch_size", "train.per_device_batch_size"),)


def _set_keys(values: dict, prefix: str = "") -> set[str]:
    out = set()
    for key, value in values.items():
        out |= _set_keys(value, f"{prefix}{key}.") if isinstance(value, dict) else {prefix + key}
    return out


def check_superseded(cfg: Any, setters: list[tuple[str, set[str]]]) -> None:
    """`setters`: (origin, dotted keys it sets), in the order applied."""
    for winner, loser in SUPERSEDED:
        if not OmegaConf.select(cfg, winner, default=0):
            continue
        last = {key: i for i, (_, keys) in enumerate(setters) for key in (winner, loser)
                if key in keys}
        if last.get(loser, -1) > last.get(winner, -1):
            raise RecipeError(
                f"{setters[last[loser]][0]}: '{loser}' has no effect while '{winner}' is "
                f"{OmegaConf.select(cfg, winner)} (set in "
                f"{setters[last[winner]][0] if winner in last else 'the defaults'}), which "
                f"decides it; set '{winner}' instead, or {winner}=0 to use '{loser}'")


def load_recipe(schema: type[T], name_or_path: str | None, overrides: list[str] | None = None) -> T:
    """Build a `schema` instance from a recipe file (or only defaults) plus dotted overrides."""
    cfg = OmegaConf.structured(schema)
    setters: list[tuple[str, set[str]]] = []
    if name_or_path:
        for path, values in _read_yaml_chain(find_recipe(name_or_path)):
            _check_keys(schema, values, str(path))
            cfg = _merge(cfg, values, str(path))
            setters.append((str(path), _set_keys(values)))
    for item in overrides or []:
        if "=" not in item:
            raise RecipeError(f"override '{item}': expected KEY=VALUE, e.g. train.lr=3e-5")
        if item.endswith("="):  # `eval.data=` means the empty string, not None (YAML's null)
            item += "''"
        dotted = OmegaConf.to_container(OmegaConf.from_dotlist([item]))
        key, raw = item.split("=", 1)
        if isinstance(OmegaConf.select(cfg, key, default=None), str):
            # a text field takes the text as typed: YAML would read `no`/`off` as False, 3e-5 as
            # a float, and OmegaConf would then store "False" (train.mixed_precision=no)
            dotted = OmegaConf.to_container(OmegaConf.from_dotlist([f"{key}={raw!r}"])) \
                if raw and raw[0] not in "'\"" else dotted
        _check_keys(schema, dotted, f"override '{item}'")
        cfg = _merge(cfg, dotted, f"override '{item}'")
        setters.append((f"override '{item}'", _set_keys(dotted)))
    check_superseded(cfg, setters)
    try:
        obj = OmegaConf.to_object(cfg)
    except OmegaConfBaseException as exc:
        raise RecipeError(f"recipe {name_or_path}: {exc}") from exc
    validate_tree(obj)
    return obj  # type: ignore[return-value]


def validate_tree(obj: Any) -> None:
    """Call `validate()` on the recipe and every nested section that defines one."""
    if not dataclasses.is_dataclass(obj):
        return
    for f in dataclasses.fields(obj):
        validate_tree(getattr(obj, f.name))
    check = getattr(obj, "validate", None)
    if callable(check):
        check()


def recipe_to_yaml(obj: Any) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(obj))


def save_recipe(obj: Any, path: str | os.PathLike) -> Path:
    """Write the resolved recipe (atomically) next to a run's outputs."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(recipe_to_yaml(obj), encoding="utf-8")
    os.replace(tmp, path)
    return path
