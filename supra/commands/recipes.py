"""`supra recipes`: the shipped recipes with their one-line descriptions; `recipe=NAME` prints one."""

from __future__ import annotations

import sys

from omegaconf import DictConfig, OmegaConf
from rich.table import Table

from ..config import recipe_names, recipe_text
from .common import console


def run(cfg: DictConfig) -> int:
    if cfg.recipe:
        # As it is, not through the console, which wraps long lines: `supra recipes recipe=X > my.yaml`
        # must give a file that loads again.
        sys.stdout.write(recipe_text(cfg.recipe))
        return 0
    table = Table(title="supra recipes (supra <command> recipe=NAME)")
    table.add_column("recipe", style="bold")
    table.add_column("description")
    for name in recipe_names():
        table.add_row(name, str(OmegaConf.create(recipe_text(name)).get("description", "")))
    console.print(table)
    return 0
