"""The recipes shipped inside the package: named YAML configs under ``reviewkd/configs``.

A recipe is named by its path below that folder without ``.yaml``, e.g.
``fashion_mnist/resnet20_resnet8/reviewkd``. Files whose name starts with ``_`` are bases that other
recipes start from, not recipes. ``reviewkd train NAME`` and :func:`reviewkd.config.load_config`
accept a name wherever they accept a file; a path to an existing file always wins.
"""
from __future__ import annotations

from difflib import get_close_matches
from pathlib import Path

RECIPES_DIR = Path(__file__).resolve().parent / "configs"


def recipe_names(under: str | None = None) -> list[str]:
    """Every recipe's name, sorted; ``under`` keeps those below that folder (e.g. ``cifar100``)."""
    root = RECIPES_DIR / under if under else RECIPES_DIR
    if not root.is_dir():
        return []
    return sorted(
        p.relative_to(RECIPES_DIR).with_suffix("").as_posix()
        for p in root.rglob("*.yaml")
        if not p.name.startswith("_")
    )


def find_recipe(name: str) -> Path:
    """The file of recipe ``name`` (with or without ``.yaml``); a one-line error with the closest names."""
    stem = name.removesuffix(".yaml").strip("/")
    path = RECIPES_DIR / f"{stem}.yaml"
    if stem and not stem.startswith(".") and ".." not in Path(stem).parts and path.is_file() \
            and not path.name.startswith("_"):
        return path
    names = recipe_names()
    close = get_close_matches(stem, names, n=3, cutoff=0.5)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    raise FileNotFoundError(f"config file not found: {name} (nor a recipe of that name).{hint} "
                            "`reviewkd recipes` lists the recipes")


def recipe_summary(name: str) -> dict:
    """One row for ``reviewkd recipes``: what the recipe trains (its bases merged in)."""
    from .config import read_config_file

    data = read_config_file(find_recipe(name))
    section = lambda key: data.get(key) if isinstance(data.get(key), dict) else {}  # noqa: E731
    return {"recipe": name, "task": data.get("task", "classification"), "data": section("data").get("name", ""),
            "model": section("model").get("name", ""), "teacher": section("teacher").get("name", ""),
            "method": section("method").get("name", "vanilla")}
