"""localora as a real package: a built wheel, installed non-editably, works from anywhere, and a
user's own models.toml and prompts live in the config dir without touching the install."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from localora import paths
from localora.cli import main
from localora.vlm import prompts
from support import one_error_line

REPO = Path(__file__).resolve().parent.parent


def _source_copy(dest: Path) -> Path:
    """The checkout's files as a clean clone would have them, plus new files not yet added.

    Built in place, setuptools packs whatever an earlier build left in build/lib, so a module
    deleted since would still ship and this test would pass on it; and a file that .gitignore
    hides (once localora/runs/__init__.py) is missing from a clean clone's wheel only."""
    listed = subprocess.run(["git", "-C", str(REPO), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                            capture_output=True)
    if listed.returncode != 0:  # not a git checkout: copy it all but the build output
        shutil.copytree(REPO, dest, symlinks=True,
                        ignore=shutil.ignore_patterns("build", "dist", "*.egg-info", "__pycache__", ".*"))
        return dest
    for name in filter(None, listed.stdout.decode().split("\0")):
        if os.path.lexists(REPO / name):  # deleted here but not yet staged
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, dest / name, follow_symlinks=False)
    return dest


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """A wheel of this checkout, installed with pip into a fresh target folder (no network)."""
    tmp = tmp_path_factory.mktemp("wheel")
    source = _source_copy(tmp / "source")
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                            "-w", str(tmp / "dist"), str(source)], capture_output=True, text=True)
    assert build.returncode == 0, build.stderr
    (wheel,) = (tmp / "dist").glob("localora-*.whl")
    target = tmp / "site"
    install = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "-q",
                              "--target", str(target), str(wheel)], capture_output=True, text=True)
    assert install.returncode == 0, install.stderr
    return wheel, target


def test_the_wheel_carries_every_subpackage_and_data_file(installed):
    wheel, _ = installed
    names = set(zipfile.ZipFile(wheel).namelist())
    for package in ("", "diffusion/", "vlm/", "scoring/", "search/", "runs/", "bench/", "ui/", "cli/", "tiny/"):
        assert f"localora/{package}__init__.py" in names, package
    assert "localora/models.toml" in names
    assert {f"localora/prompts/{n}.txt" for n in ("system", "generate", "feedback", "refine", "select", "judge")} <= names
    assert any(n.startswith("localora/bench/testbeds/") and n.endswith(".toml") for n in names)


@pytest.mark.slow
def test_installed_wheel_runs_models_and_demo_outside_the_checkout(installed, tmp_path):
    _, target = installed
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    env = {**os.environ, "PYTHONPATH": str(target), "LOCALORA_HOME": str(tmp_path / "home"),
           "LOCALORA_CONFIG": str(tmp_path / "config"), "HF_HUB_OFFLINE": "1"}

    def run(*args):
        return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)

    where = run("-c", "import localora; print(localora.__file__)")
    assert Path(where.stdout.strip()).is_relative_to(target), where.stdout + where.stderr
    script = subprocess.run([str(target / "bin" / "localora"), "--version"], cwd=cwd, env=env, capture_output=True,
                            text=True, timeout=60)  # the entry point pipx puts on PATH
    assert script.returncode == 0 and "localora" in script.stdout, script.stdout + script.stderr
    models = run("-m", "localora", "models")
    assert models.returncode == 0, models.stderr
    assert str(target / "localora" / "models.toml") in models.stdout and "\ntiny:" in models.stdout
    assert f"your own copies go in {tmp_path / 'config'}" in models.stdout
    demo = run("-m", "localora", "demo", "--plain", "--out", "run")
    assert demo.returncode == 0, demo.stdout + demo.stderr
    for name in ("run.json", "events.jsonl", "final.png", "final.json", "report.html"):
        assert (cwd / "run" / name).is_file(), name


def test_models_toml_precedence(tmp_path, monkeypatch):
    monkeypatch.setenv("LOCALORA_CONFIG", str(tmp_path / "config"))
    assert paths.models_toml() == paths.PACKAGE_DIR / "models.toml"
    user = tmp_path / "config" / "models.toml"
    user.parent.mkdir()
    user.write_text((paths.PACKAGE_DIR / "models.toml").read_text())
    assert paths.models_toml() == user
    monkeypatch.setenv("LOCALORA_MODELS", str(tmp_path / "mine.toml"))
    assert paths.models_toml() == tmp_path / "mine.toml"


def test_models_names_the_file_it_read_and_where_own_copies_go(tmp_path, monkeypatch):
    config = tmp_path / "config"
    config.mkdir()
    monkeypatch.setenv("LOCALORA_CONFIG", str(config))
    (config / "models.toml").write_text((paths.PACKAGE_DIR / "models.toml").read_text())
    result = CliRunner().invoke(main, ["models"])
    assert result.exit_code == 0, result.output
    first, second = result.output.splitlines()[:2]
    assert first.startswith(f"profiles in {config / 'models.toml'} ")
    assert second == f"your own copies go in {config}: models.toml, prompts/NAME.txt"


def test_prompt_precedence(tmp_path, monkeypatch):
    monkeypatch.setenv("LOCALORA_CONFIG", str(tmp_path / "config"))
    assert prompts.template_path("feedback") == paths.shipped_prompts_dir() / "feedback.txt"
    user = tmp_path / "config" / "prompts" / "feedback.txt"
    user.parent.mkdir(parents=True)
    user.write_text("mine {answer_format}")
    assert prompts.template_path("feedback") == user
    assert prompts.template_path("refine") == paths.shipped_prompts_dir() / "refine.txt"  # per file
    override = tmp_path / "override"
    override.mkdir()
    (override / "feedback.txt").write_text("override")
    assert prompts.template_path("feedback", override) == override / "feedback.txt"


@pytest.mark.parametrize("kind, what", [("missing", "no such folder"), ("file", "not a folder")])
@pytest.mark.parametrize("command", ["compose", "judge"])
@pytest.mark.parametrize("option", ["--templates", "--prompts"])  # judge's --prompts: the hidden old name
def test_prompts_option_naming_no_folder_is_one_error_line(tmp_path, command, kind, what, option):
    bad = tmp_path / "prompts"
    if kind == "file":
        bad.write_text("not a folder")
    image = tmp_path / "a.png"
    image.write_bytes(b"")  # judge's arguments must exist; the check comes before anything reads them
    args = {"compose": ["compose", "x", "-l", "demo-style", "-l", "demo-character", "--out", str(tmp_path / "r")],
            "judge": ["judge", str(image), str(image), "--element", "style (S): s"]}[command]
    result = CliRunner().invoke(main, [*args, option, str(bad)])
    one_error_line(result, f"{option} {bad}", what)
    assert not (tmp_path / "r").exists()


def test_judge_names_its_templates_option_as_compose_does():
    from localora.cli.evaluate import judge

    shown = judge.get_help(click.Context(judge))
    assert "--templates DIR" in shown and "--prompts" not in shown
