"""The README stays true: every setting is in its table, and its test command is what CI runs."""
from pathlib import Path

from latentd.config.settings import Settings

ROOT = Path(__file__).resolve().parent.parent


def test_readme_documents_every_setting():
    readme = (ROOT / "README.md").read_text()
    missing = [f"LATENTD_{name.upper()}" for name in Settings.model_fields
               if f"`LATENTD_{name.upper()}`" not in readme]
    assert not missing, f"README settings table lacks {missing}"


def test_readme_test_command_is_what_ci_runs():
    readme = (ROOT / "README.md").read_text()
    assert "bash scripts/test.sh" in readme
    ci = ROOT / ".ci" / "run"
    if ci.exists():
        assert "bash scripts/test.sh" in ci.read_text()


def test_app_never_imports_torch():
    import subprocess
    import sys

    code = ("import sys, app.main, latentd.cmd_serve, latentd.cmd_keys, latentd.cmd_dev; "
            "sys.exit(1 if 'torch' in sys.modules else 0)")
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT).returncode == 0
