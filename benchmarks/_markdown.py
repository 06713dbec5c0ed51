"""The ``--markdown FILE`` option of the benchmarks whose README table is made from a results file they wrote.

Example:
    >>> parser = argparse.ArgumentParser()
    >>> add_markdown_option(parser, "results.json")
    >>> parser.parse_args(["--markdown", "r.json"]).markdown
    PosixPath('r.json')
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any


def add_markdown_option(parser: argparse.ArgumentParser, results: str) -> None:
    """``--markdown FILE``: print the README's table of a `results` file instead of running anything."""
    parser.add_argument("--markdown", type=Path, default=None,
                        help=f"Only print the table of this {results} in markdown (the README's); run nothing.")


def print_markdown(path: Path, render: Callable[[dict[str, Any]], str]) -> dict[str, str]:
    """Print `render` of the JSON file at `path`; the table is also returned, as ``{"markdown": table}``."""
    table = render(json.loads(path.read_text()))
    print(table)
    return {"markdown": table}
