"""Recipes and overrides → a validated :class:`~toolkit.config.schema.RunConfig`, and back to YAML.

A recipe YAML (``recipes/<family>/<name>.yaml``) is merged onto the schema, then ``KEY=VALUE``
overrides from the command line. Unknown keys and values of the wrong type are a one-line
:class:`~toolkit.errors.ConfigError` that names the file, line and the closest valid key.
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from toolkit.config.schema import SCHEMA_KEYS, RunConfig
from toolkit.config.validation import validate
from toolkit.errors import ConfigError, RecipeError, closest, first_line


def _key_lines(path: Path) -> dict[str, int]:
    """Map dotted keys of a YAML file to their 1-based line numbers (for error messages)."""
    import yaml

    lines: dict[str, int] = {}

    def walk(node, prefix):
        if isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                key = f"{prefix}{k.value}"
                lines[key] = k.start_mark.line + 1
                walk(v, key + ".")

    try:
        walk(yaml.compose(path.read_text()), "")
    except yaml.YAMLError:
        pass
    return lines


def _check_keys(cfg: DictConfig, where: str, lines: dict[str, int] | None = None) -> None:
    def walk(node, prefix):
        for k in node.keys():
            full = f"{prefix}{k}"
            if full not in SCHEMA_KEYS:
                hint = closest(full, SCHEMA_KEYS)
                at = f"{where}:{lines[full]}" if lines and full in lines else where
                raise ConfigError(
                    f"{at}: unknown config key {full!r}" + (f"; did you mean '{hint}'?" if hint else "")
                )
            child = node._get_node(k)  # unresolved: an interpolation resolves once every layer is merged
            if isinstance(child, DictConfig) and full + "." in {s[: len(full) + 1] for s in SCHEMA_KEYS}:
                walk(child, full + ".")

    walk(cfg, "")


def list_recipes() -> dict[str, Path]:
    """Registered recipe names → their YAML files."""
    from toolkit.assets import recipes_dir

    return {p.stem: p for p in sorted(recipes_dir().glob("*/*.yaml"))}


def resolve_recipe(recipe: str) -> Path:
    """A recipe name or a path to a YAML file → the YAML file."""
    path = Path(recipe)
    if path.suffix in (".yaml", ".yml"):
        if not path.is_file():
            raise RecipeError(f"recipe file '{recipe}' does not exist; pass a registered recipe name or a YAML path")
        return path
    recipes = list_recipes()
    if recipe not in recipes:
        hint = closest(recipe, recipes)
        raise RecipeError(
            f"no recipe named '{recipe}'"
            + (f"; did you mean '{hint}'?" if hint else "")
            + " Run `megaforge recipes` to list them."
        )
    return recipes[recipe]


def parse_overrides(overrides: list[str]) -> DictConfig:
    """``KEY=VALUE`` strings → a config, with unknown keys rejected."""
    import yaml

    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not KEY=VALUE (e.g. trainer.max_steps=30)")
    try:
        cfg = OmegaConf.from_dotlist(list(overrides))
    except (OmegaConfBaseException, yaml.YAMLError) as e:  # values are parsed as YAML
        raise ConfigError(f"command-line overrides: {first_line(e)}") from None
    _check_keys(cfg, "command line")
    return cfg


def _split_blend_string(layer: DictConfig) -> None:
    """``data.data_prefix`` given as one string, as Megatron-LM's ``--data-path`` takes it
    (``"0.3 /data/a 0.7 /data/b"`` or ``"/data/a"``) → the list of its whitespace-separated items."""
    data = layer.get("data")
    if isinstance(data, DictConfig) and isinstance(data.get("data_prefix"), str):
        data.data_prefix = data.data_prefix.split()


def load_config(recipe: str | None = None, overrides: list[str] | tuple = ()) -> RunConfig:
    """Build a validated :class:`RunConfig` from a recipe (name or YAML path) and overrides."""
    schema = OmegaConf.structured(RunConfig)
    layers = [schema]
    if recipe is not None:
        path = resolve_recipe(recipe)
        try:
            layer = OmegaConf.load(path)
        except Exception as e:  # YAML syntax errors
            raise ConfigError(f"{path}: cannot parse YAML: {first_line(e)}") from None
        if not isinstance(layer, DictConfig):
            raise ConfigError(f"{path}: a recipe must be a mapping of config sections")
        lines = _key_lines(path)
        _check_keys(layer, str(path), lines)
        if "name" not in layer:
            layer.name = path.stem
        layers.append((layer, str(path), lines))
    layers.append((parse_overrides(list(overrides)), "command line", {}))
    merged = schema
    for item in layers[1:]:
        layer, where, lines = item
        _split_blend_string(layer)
        try:
            merged = OmegaConf.merge(merged, layer)
        except (OmegaConfBaseException, TypeError) as e:  # TypeError: a mapping given for a list, which names no key
            key = getattr(e, "full_key", None) or _list_given_mapping(layer) or ""
            at = f"{where}:{lines[key]}" if key in lines else where
            raise ConfigError(f"{at}: invalid value for {key!r}: {first_line(e)}" if key else
                              f"{at}: invalid value: {first_line(e)}") from None
    try:
        cfg: RunConfig = OmegaConf.to_object(merged)  # type: ignore[assignment]  # resolves ${...} interpolations
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None) or ""
        raise ConfigError(f"cannot resolve {key or 'the config'}: {first_line(e)}; an interpolation ${{KEY}} must "
                          "name a key of the config that holds a value of the right type") from None
    validate(cfg)
    return cfg


def _list_given_mapping(layer: DictConfig, prefix: str = "") -> str | None:
    """The first key of ``layer`` whose schema type is a list but which holds a mapping."""
    for k in layer.keys():
        full, child = f"{prefix}{k}", layer._get_node(k)
        if isinstance(child, DictConfig):
            if str(SCHEMA_KEYS.get(full, "")).startswith("List"):
                return full
            found = _list_given_mapping(child, full + ".")
            if found:
                return found
    return None


def to_yaml(cfg: RunConfig) -> str:
    """The fully resolved config as YAML (saved in every run directory)."""
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def save_config(cfg: RunConfig, path: str | Path) -> None:
    Path(path).write_text(to_yaml(cfg))
