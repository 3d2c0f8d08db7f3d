"""benchmarks/quality.py --dry-run: every training command of every section names a recipe whose
overrides load (an unknown key or a bad value in a benchmark's overrides fails here, in seconds,
not hours into `make bench`)."""
import os
import shlex
from pathlib import Path

from benchmarks.quality import SECTIONS, main
from benchmarks.quality_runs import load_script_recipe


def test_every_section_command_loads_its_recipe(tmp_path, monkeypatch, capsys):
    data = os.environ.get("TWOTOWER_DATA", "")
    sections = sorted(SECTIONS)
    if not (Path(data) / "msmarco_sample").is_dir():
        sections.remove("other_corpus")  # reads the other corpus's layout even in a dry run
        monkeypatch.setenv("TWOTOWER_DATA", str(tmp_path))
    assert main([*sections, "--seeds", "42", "1", "--dry-run"]) == 0
    commands = [shlex.split(line[2:]) for line in capsys.readouterr().out.splitlines()
                if line.startswith("$ ") and " --recipe " in line]
    scripts = {Path(cmd[0]).parent.name for cmd in commands}
    assert {"finetune", "pretrain"} <= scripts and len(commands) >= 40
    checked = 0
    for cmd in commands:
        script = f"{Path(cmd[0]).parent.name}/{Path(cmd[0]).name}"
        if script not in ("finetune/run.py", "pretrain/run.py"):
            continue  # sentence-transformers' script (benchmarks/quality_st.py) has its own CLI
        recipe = cmd[cmd.index("--recipe") + 1]
        load_script_recipe(script, recipe, cmd[cmd.index("--recipe") + 2:])
        checked += 1
    assert checked >= 40
