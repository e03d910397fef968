"""The shape of the code and of its two commands: which package may import which, sample.py without
--ckpt, and a resumed run that repeats the options it was started with."""

from __future__ import annotations

import ast
import os
import shutil
from collections import defaultdict
from pathlib import Path

import pytest

import sample
import train
from core.checkpoint import load_checkpoint, save_checkpoint
from helpers import tiny_args

ROOT = Path(__file__).resolve().parents[1]
ENTRY_POINTS = {"train", "sample"}
REGISTRY = "stages"
# Tools that open any stage's checkpoints or start any stage's runs: they sit above the registry.
ABOVE_REGISTRY = {"evaluate", "bench"}
NOT_PROJECT = {"tests", "examples", ".git", ".ci"}


def top_level_units() -> set[str]:
    """The project's packages and top-level modules, as an import statement names them."""
    units = {p.stem for p in ROOT.glob("*.py")}
    units |= {p.name for p in ROOT.iterdir() if p.is_dir() and p.name not in NOT_PROJECT and any(p.glob("*.py"))}
    return units


def import_graph() -> dict[str, set[str]]:
    """unit -> the other units it imports anywhere in its files (at the top or inside functions)."""
    units = top_level_units()
    graph: dict[str, set[str]] = defaultdict(set)
    for path in ROOT.rglob("*.py"):
        relative = path.relative_to(ROOT)
        if relative.parts[0] in NOT_PROJECT:
            continue
        unit = relative.parts[0] if len(relative.parts) > 1 else relative.stem
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            graph[unit] |= {name.split(".")[0] for name in names} & units - {unit}
    return graph


def cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of `graph` as a path that returns to its start, or None."""
    state: dict[str, str] = {}

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return path[path.index(nxt):] + [nxt] if nxt in path else [node, nxt]
            if nxt not in state and (found := visit(nxt, path + [nxt])):
                return found
        state[node] = "done"
        return None

    for start in sorted(graph):
        if start not in state and (found := visit(start, [start])):
            return found
    return None


def test_nothing_imports_the_entry_points_and_only_the_top_imports_the_registry():
    graph = import_graph()
    assert {"ddpm", "vae", "ldm", "invert", "classify", "sampling", "training"} <= top_level_units()
    for unit, imported in graph.items():
        assert not imported & ENTRY_POINTS, f"{unit} imports {imported & ENTRY_POINTS}: entry points are imported by no one"
        if REGISTRY in imported:
            assert unit in ENTRY_POINTS | ABOVE_REGISTRY, f"{unit} imports the stage registry from below it"


def test_the_import_graph_has_no_cycle():
    graph = import_graph()
    assert cycle(graph) is None, f"import cycle: {' -> '.join(cycle(graph))}"


def test_the_cycle_finder_finds_a_planted_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycle(graph) == ["a", "b", "c", "a"]
    assert cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_sample_without_ckpt_draws_from_the_newest_run_that_draws_images(tmp_path, monkeypatch, capsys, image_folder):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match="train one"):
        sample.main(["--sampler", "ddim", "--steps", "2", "--num", "2", "--device", "cpu"])
    train.main(tiny_args(tmp_path / "runs" / "older", image_folder, steps=1))
    shutil.copytree(tmp_path / "runs" / "older", tmp_path / "runs" / "newer")
    classifier = tmp_path / "runs" / "classifier" / "checkpoint.pt"  # newest of all, but draws no images
    classifier.parent.mkdir()
    save_checkpoint({"stage": "classify"}, classifier)
    for age, name in ((300, "older"), (200, "newer"), (100, "classifier")):
        stamp = (tmp_path / "runs" / name / "checkpoint.pt").stat().st_mtime - age
        os.utime(tmp_path / "runs" / name / "checkpoint.pt", (stamp, stamp))
    os.utime(classifier, None)
    broken = tmp_path / "runs" / "broken" / "checkpoint.pt"     # newer still, and not a checkpoint at all
    broken.parent.mkdir()
    broken.write_text("not a checkpoint")
    out = sample.main(["--sampler", "ddim", "--steps", "2", "--num", "2", "--device", "cpu"])
    assert out.resolve().is_relative_to((tmp_path / "runs" / "newer").resolve())
    assert (out / "grid.png").is_file()
    assert "runs/newer/checkpoint.pt" in capsys.readouterr().out  # it says which run it picked


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory) -> Path:
    from PIL import Image
    import numpy as np
    root = tmp_path_factory.mktemp("images")
    for k in range(4):
        Image.fromarray(np.full((16, 16, 3), 40 * k, np.uint8)).save(root / f"img{k}.png")
    return root


def test_resume_accepts_the_fixed_options_repeated_unchanged_and_refuses_a_change(tmp_path, image_folder):
    run_dir = tmp_path / "run"
    train.main(tiny_args(run_dir, image_folder, steps=1))
    train.main(tiny_args(run_dir, image_folder, "--resume", steps=2))  # the first command again, with --resume
    assert load_checkpoint(run_dir / "checkpoint.pt")["step"] == 2
    with pytest.raises(ValueError, match=r"^--lr \(the run's: [0-9.e-]+\) cannot change when resuming"):
        train.main(tiny_args(run_dir, image_folder, "--resume", "--lr", "0.5", steps=3))
    with pytest.raises(ValueError, match=r"^--base-channels \(the run's: 32\) cannot change"):
        train.main(tiny_args(run_dir, image_folder, "--resume", "--base-channels", "64", steps=3))
    assert load_checkpoint(run_dir / "checkpoint.pt")["step"] == 2


def test_every_stage_lists_its_config_sections_data_first_and_train_last():
    import dataclasses
    from stages import STAGES
    for spec in STAGES.values():
        names = [section.name for section in spec.sections]
        assert sorted(names) == sorted(f.name for f in dataclasses.fields(spec.config_class)), spec.name
        assert names[0] == "data" and names[-1] == "train", spec.name
        for section in spec.sections:
            assert isinstance(getattr(spec.presets[spec.default_preset](), section.name), section.cls)
