"""`pip install .` (not editable) gives one import name, `twotower`, the recipes inside it and the
`twotower` command, which runs a recipe by name from a folder that is not the checkout.

The wheel is built from the checkout and installed into a fresh venv. The venv reaches this
machine's dependencies (torch, transformers, ...) through a .pth line naming their folder; a plain
path line adds the folder without running the .pth files in it, so the checkout's own editable
install (if any) stays out of sight and `import common` can only fail."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FOLDERS = ("common", "pretrain", "finetune")


def build_wheel(out: Path) -> Path:
    """From a copy of the files git knows (not ignored ones): setuptools builds in the source
    folder, and a stale build/ there could slip modules into the wheel that the checkout lacks."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, check=True,
                           capture_output=True, text=True).stdout.splitlines()
    source = out / "source"
    for name in files:
        if (REPO / name).is_file():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, source / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                    "-q", "-w", str(out), str(source)], check=True, capture_output=True, text=True)
    (wheel,) = out.glob("twotower-*.whl")
    return wheel


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    return build_wheel(tmp_path_factory.mktemp("wheel"))


def test_the_wheel_holds_twotower_only_with_every_module_and_recipe(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert top == {"twotower"}
    expected = {f"twotower/{p.relative_to(REPO).as_posix()}" for folder in FOLDERS
                for p in (REPO / folder).rglob("*.py")}
    missing = expected - set(names)  # a subfolder left out of pyproject's package list
    assert not missing, sorted(missing)
    recipes = {f"twotower/recipes/{p.relative_to(REPO / 'recipes').as_posix()}"
               for p in (REPO / "recipes").rglob("*.yaml")}
    assert recipes and recipes <= set(names), sorted(recipes - set(names))
    entry = next(n for n in names if n.endswith("entry_points.txt"))
    assert "twotower = twotower.common.console:main" in zipfile.ZipFile(wheel).read(entry).decode()


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("TWOTOWER_DATA"), reason="TWOTOWER_DATA is not set")
def test_installed_command_runs_a_recipe_from_an_unrelated_folder(wheel, tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()"
                                "['purelib'])"], check=True, capture_output=True, text=True).stdout.strip())
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps",
                    "-q", str(wheel)], check=True, capture_output=True, text=True)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "TWOTOWER_RECIPES")}
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env['PATH']}"

    def run(*cmd):
        return subprocess.run(cmd, cwd=elsewhere, env=env, capture_output=True, text=True, timeout=600)

    probe = run(str(python), "-c", "import twotower.common, twotower.finetune.run as r; print(r.__file__)")
    assert probe.returncode == 0, probe.stderr
    assert probe.stdout.strip().startswith(str(site)), probe.stdout  # the installed copy
    for name in FOLDERS:
        gone = run(str(python), "-c", f"import {name}")
        assert gone.returncode != 0 and "No module named" in gone.stderr, (name, gone.stderr)
    listed = run("twotower", "recipes")
    assert listed.returncode == 0 and "fewshot_cpu" in listed.stdout.split(), listed.stderr
    done = run("twotower", "finetune", "--recipe", "fewshot_cpu", "train.max_steps=2",
               "train.output_dir=out", "eval.max_queries=5", "eval.max_docs=50")
    assert done.returncode == 0, done.stderr[-3000:]
    assert (elsewhere / "out" / "model" / "config.json").is_file()
    assert (elsewhere / "out" / "recipe.yaml").is_file()
