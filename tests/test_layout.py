"""Every service has the same shape, test code stays out of product code, and rows are seeded one way."""
from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SERVICES = ("mqtt-bridge", "history-logger", "automation-engine", "scheduler", "device-registry")
TEST_CODE = re.compile(r"^(test_.*|conftest|testing)\.py$")
SHAPE = """
import inspect
import main, metrics, settings
assert inspect.isclass(settings.ServiceSettings), "settings.ServiceSettings"
assert isinstance(inspect.getattr_static(settings.ServiceSettings, "from_env"), classmethod), "from_env"
assert list(inspect.signature(main.build).parameters) == ["settings", "options"], "build(settings, options)"
"""


@pytest.mark.parametrize("service", SERVICES)
def test_every_service_has_the_same_shape(service):
    """settings.ServiceSettings.from_env, a metrics module and build(settings, options) in main.py, each
    imported in an interpreter of its own as `python main.py` would."""
    proc = subprocess.run([sys.executable, "-c", SHAPE], cwd=ROOT / service, capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)), timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]


def _product_modules():
    for folder in ("common", *SERVICES):
        for path in sorted((ROOT / folder).rglob("*.py")):
            if not TEST_CODE.match(path.name):
                yield path


def test_product_code_never_imports_test_code():
    found = []
    for path in _product_modules():
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] + [f"{node.module}.{a.name}" for a in node.names] \
                if isinstance(node, ast.ImportFrom) else []
            if any(n in ("testing", "conftest", "common.testing") or n.startswith("common.testing.") for n in names):
                found.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert found == []


SEEDED = re.compile(r"INSERT INTO (greenhouses|zones|nodes|node_channels|recipes|recipe_phases|zone_recipe_instances)\b")
RAW_ROWS_ON_PURPOSE = {"common/test_db_migrate.py"}  # migrations are tested on rows as Laravel leaves them


def test_tests_seed_rows_only_through_the_one_helper():
    found = []
    for folder in ("common", "tests", *SERVICES):
        for path in sorted((ROOT / folder).rglob("*.py")):
            rel = str(path.relative_to(ROOT))
            if (TEST_CODE.match(path.name) or folder == "tests") and rel != "common/testing.py" and rel not in RAW_ROWS_ON_PURPOSE:
                found += [f"{rel}: {m.group(0)}" for m in SEEDED.finditer(path.read_text())]
    assert found == []
