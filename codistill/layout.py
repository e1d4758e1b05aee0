"""The run directory: every path the trainer, the exchange, evaluation and plots use.

    RUN_DIR/
      config.json                 resolved flags, model config, ds_config, git commit (of the last launch)
      summary.json                per group: final metrics (merged from group_i/summary.json)
      group_i/
        exports/                  step_NNNNNN.safetensors + .json, LATEST   (codistill/exports.py)
        checkpoints/              DeepSpeed tags global_stepN/, latest       (codistill/checkpoint.py)
        final/                    model.safetensors, config.json, meta.json (+ hf/)
        tb/                       TensorBoard events
        summary.json              this group's final metrics
        config.json               --group_id launches: this group's launch's config.json (its model)
        LOCK                      held by the process training the group     (codistill/lock.py)
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

GROUP_DIR = re.compile(r"^group_(\d+)$")


@dataclass(frozen=True)
class GroupLayout:
    dir: Path
    id: int

    @property
    def exports(self) -> Path:
        return self.dir / "exports"

    @property
    def checkpoints(self) -> Path:
        return self.dir / "checkpoints"

    @property
    def final(self) -> Path:
        return self.dir / "final"

    @property
    def tb(self) -> Path:
        return self.dir / "tb"

    @property
    def summary(self) -> Path:
        return self.dir / "summary.json"

    @property
    def config(self) -> Path:
        return self.dir / "config.json"

    @property
    def lock(self) -> Path:
        return self.dir / "LOCK"


@dataclass(frozen=True)
class RunLayout:
    root: Path

    def __post_init__(self):
        object.__setattr__(self, "root", Path(self.root))

    @property
    def config(self) -> Path:
        return self.root / "config.json"

    @property
    def summary(self) -> Path:
        return self.root / "summary.json"

    def group(self, g: int) -> GroupLayout:
        return GroupLayout(self.root / f"group_{g}", g)

    def launch_config(self, group_id: int | None) -> Path:
        """The config.json that records a launch's model for its resume check: the run's, or with
        --group_id its group's own (launches per group may train different models: --peer_models any)."""
        return self.config if group_id is None else self.group(group_id).config

    def groups(self) -> list[GroupLayout]:
        """The group directories present, by id."""
        found = [GroupLayout(p, int(m.group(1))) for p in self.root.iterdir()
                 if p.is_dir() and (m := GROUP_DIR.match(p.name))] if self.root.is_dir() else []
        return sorted(found, key=lambda g: g.id)




def exports_dir(run_dir: Path, g: int) -> Path:
    return RunLayout(run_dir).group(g).exports
