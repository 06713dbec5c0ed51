"""The layout says what the spiral is: one package per stage with the same three files, stage topics
that match the code, the README's stage table made from the registry, and no prefixes for folders.

The import layers themselves are checked by `lint-imports` in `.ci/run` (pyproject's
``[tool.importlinter]``).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from dpe.cli.stages import ROOT, SERVICE_COMMANDS, STAGES, Stage, stage_table
from dpe.events import DeadLetter
from dpe.topics import TOPICS

TOPIC_OF_MODEL = {spec.model.__name__: topic_id for topic_id, spec in TOPICS.items() if spec.model is not DeadLetter}


def package_folder(stage: Stage) -> Path:
    return ROOT / stage.package.replace(".", "/")


def imported_topic_models(folder: Path) -> set[str]:
    """Topic ids whose event model any module of `folder` imports from `dpe.events`."""
    found = set()
    for path in folder.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module == "dpe.events":
                found |= {TOPIC_OF_MODEL[alias.name] for alias in node.names if alias.name in TOPIC_OF_MODEL}
    return found


@pytest.mark.parametrize("stage", STAGES, ids=lambda stage: stage.name)
def test_every_stage_has_its_service_settings_and_command_files(stage: Stage) -> None:
    folder = package_folder(stage)
    assert {"service.py", "settings.py", "cli.py"} <= {path.name for path in folder.glob("*.py")}, folder


@pytest.mark.parametrize("stage", STAGES, ids=lambda stage: stage.name)
def test_a_stages_declared_topics_are_the_event_models_its_code_imports(stage: Stage) -> None:
    assert imported_topic_models(package_folder(stage)) == {*stage.consumes, *stage.produces}


def test_the_readme_stage_table_is_the_one_made_from_the_registry() -> None:
    assert stage_table() in (ROOT / "README.md").read_text(), "run `dpe stages` and paste its table into the README"


def test_every_serve_command_is_a_stage_and_loads() -> None:
    from dpe.cli import serve

    assert sorted(serve.list_commands(None)) == sorted(SERVICE_COMMANDS)  # type: ignore[arg-type]
    for name in SERVICE_COMMANDS:
        assert serve.get_command(None, name).name == name  # type: ignore[arg-type,union-attr]


@pytest.mark.parametrize("top", ["dpe", "streams", "consumers", "producers", "trainer", "monitoring"])
def test_no_file_name_prefix_stands_in_for_a_folder(top: str) -> None:
    for folder in [ROOT / top, *(path for path in (ROOT / top).rglob("*") if path.is_dir())]:
        stems = [path.stem for path in folder.glob("*.py") if not path.stem.startswith("_")]
        for stem in (stem for stem in stems if "_" in stem):
            prefix = stem.split("_")[0]
            siblings = [other for other in stems if other != stem and (other == prefix or other.startswith(prefix + "_"))]
            assert not siblings, f"{folder}: {stem} beside {siblings}: make {prefix}/ a folder"
