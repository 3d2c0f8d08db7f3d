"""twotower push (common/model/push_cli.py): the model's files, and only those, go to the Hub repo
named, with the options passed through; --dry-run uploads nothing; a folder that is no saved model
is refused; a failed or offline upload exits non-zero naming the repo. No network: the HfApi calls
are replaced by fakes that copy what huggingface_hub would upload."""
from __future__ import annotations

import shutil
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from huggingface_hub import CommitInfo, RepoUrl, constants
from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled
from huggingface_hub.hf_api import DEFAULT_IGNORE_PATTERNS
from huggingface_hub.utils import filter_repo_objects

from twotower.common import console
from twotower.common.model import push_cli
from twotower.common.model.encoder import tiny_bert

REPO_ID = "someone/twotower-tiny"
OID = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> tuple[Path, set[str]]:
    """A saved model with separate towers, a card and an ONNX file, plus what is no part of it:
    an interrupted export's .partial- folder, a lock, a write_atomic temp, a checkpoints/ folder.
    Returns the folder and the files that make the model."""
    path = tmp_path_factory.mktemp("push") / "model"
    tiny_bert(shared_tower=False, dropout=0.0, hidden=16, layers=1).save(path)
    (path / "README.md").write_text("---\nlibrary_name: sentence-transformers\n---\n# tiny\n")
    for tower in (path, path / "doc_tower"):
        (tower / "onnx").mkdir()
        (tower / "onnx" / "model.onnx").write_bytes(b"onnx" * 10)
    wanted = {p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file()}
    (path / "onnx" / ".partial-abc123").mkdir()
    (path / "onnx" / ".partial-abc123" / "model_qint8_static.onnx").write_bytes(b"half")
    (path / ".partial-x").mkdir()
    (path / ".partial-x" / "model.safetensors").write_bytes(b"half")
    (path / ".lock").write_text("")
    (path / "README.md.tmp").write_text("half a card")
    (path / "checkpoints" / "step-00000001").mkdir(parents=True)
    (path / "checkpoints" / "step-00000001" / "model.safetensors").write_bytes(b"state")
    return path, wanted


@pytest.fixture
def hub(monkeypatch, tmp_path):
    """Fake HfApi calls: each records its arguments; upload_folder copies the files that
    huggingface_hub would select (its own pattern filter, its default ignores) to `uploaded`."""
    seen: dict = {"calls": [], "uploaded": tmp_path / "uploaded"}

    def create_repo(self, repo_id, **kwargs):
        seen["calls"].append(("create_repo", repo_id, kwargs, self.token))
        return RepoUrl(f"https://huggingface.co/{repo_id}")

    def create_branch(self, repo_id, **kwargs):
        seen["calls"].append(("create_branch", repo_id, kwargs, self.token))

    def upload_folder(self, *, repo_id, folder_path, **kwargs):
        seen["calls"].append(("upload_folder", repo_id, kwargs, self.token))
        root = Path(folder_path)
        files = [p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()]
        for rel in filter_repo_objects(files, allow_patterns=kwargs.get("allow_patterns"),
                                       ignore_patterns=DEFAULT_IGNORE_PATTERNS):
            (seen["uploaded"] / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(root / rel, seen["uploaded"] / rel)
        return CommitInfo(commit_url=f"https://huggingface.co/{repo_id}/commit/{OID}",
                          commit_message=kwargs["commit_message"], commit_description="", oid=OID)

    for name, fake in (("create_repo", create_repo), ("create_branch", create_branch),
                       ("upload_folder", upload_folder)):
        monkeypatch.setattr(push_cli.HfApi, name, fake)
    return seen


def uploaded(hub) -> set[str]:
    root = hub["uploaded"]
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}


def test_the_model_files_and_only_those_go_to_the_repo_with_the_options(model, hub, capsys):
    path, wanted = model
    assert push_cli.main([str(path), REPO_ID, "--private", "--revision", "dev",
                          "--commit-message", "first model", "--token", "hf_fake"]) == 0
    assert uploaded(hub) == wanted
    for part in ("README.md", "model.safetensors", "config.json", "tokenizer.json", "modules.json",
                 "twotower.json", "1_Pooling/config.json", "onnx/model.onnx",
                 "doc_tower/model.safetensors", "doc_tower/onnx/model.onnx"):
        assert part in wanted, part
    assert [c[0] for c in hub["calls"]] == ["create_repo", "create_branch", "upload_folder"]
    (_, repo, kwargs, token), (_, repo2, branch, _), (_, repo3, upload, _) = hub["calls"]
    assert (repo, repo2, repo3, token) == (REPO_ID, REPO_ID, REPO_ID, "hf_fake")
    assert kwargs == {"private": True, "exist_ok": True, "repo_type": "model"}
    assert branch["branch"] == "dev" and branch["exist_ok"]
    assert upload["revision"] == "dev" and upload["commit_message"] == "first model"
    assert upload["repo_type"] == "model"
    out = capsys.readouterr().out
    assert f"https://huggingface.co/{REPO_ID}" in out and OID in out
    assert f"{len(wanted)} files" in out


def test_defaults_make_a_public_repo_on_the_main_branch(model, hub):
    assert push_cli.main([str(model[0]), REPO_ID]) == 0
    assert [c[0] for c in hub["calls"]] == ["create_repo", "upload_folder"]  # no branch made
    assert hub["calls"][0][2]["private"] is False and hub["calls"][0][3] is None
    assert hub["calls"][1][2]["revision"] is None
    assert hub["calls"][1][2]["commit_message"] == push_cli.DEFAULT_MESSAGE
    assert uploaded(hub) == model[1]


def test_a_dry_run_lists_the_files_with_sizes_and_uploads_nothing(model, hub, capsys,
                                                                  monkeypatch):
    path, wanted = model
    monkeypatch.setattr(sys, "argv", list(sys.argv))  # console.main rewrites it
    assert console.main(["push", str(path), REPO_ID, "--dry-run"]) == 0  # through the command
    assert hub["calls"] == [] and not hub["uploaded"].exists()
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith(f"dry run: would upload {len(wanted)} files") and REPO_ID in lines[0]
    listed = {line.split("  ")[1]: line.split("  ")[2] for line in lines[1:]}
    assert set(listed) == wanted and len(lines) == len(wanted) + 1
    for name in ("model.safetensors", "README.md"):
        assert listed[name] == push_cli.human((path / name).stat().st_size)
    assert push_cli.human(900) == "900 B" and push_cli.human(3 * 1024**2) == "3.0 MB"


def test_a_folder_that_is_no_saved_model_is_refused_naming_what_is_missing(model, hub, tmp_path,
                                                                           capsys):
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "todo.txt").write_text("x")
    with pytest.raises(SystemExit) as exc:
        push_cli.main([str(notes), REPO_ID])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and str(notes) in err
    assert "config.json" in err and "model weights" in err and "README.md" in err

    no_card = tmp_path / "run" / "model"
    shutil.copytree(model[0], no_card)
    (no_card / "README.md").unlink()
    with pytest.raises(SystemExit):
        push_cli.main([str(no_card), REPO_ID])
    err = capsys.readouterr().err
    assert "README.md" in err and "config.json" not in err and "weights" not in err

    (no_card / "README.md").write_text("# card")
    (no_card / "doc_tower" / "model.safetensors").unlink()
    with pytest.raises(SystemExit):
        push_cli.main([str(no_card), REPO_ID])
    assert "doc_tower/" in capsys.readouterr().err

    with pytest.raises(SystemExit):  # the run folder, not its model/
        push_cli.main([str(no_card.parent), REPO_ID])
    assert f"did you mean {no_card}" in capsys.readouterr().err
    assert hub["calls"] == []


@pytest.mark.parametrize("where", ["create_repo", "upload_folder"])
def test_a_failed_upload_exits_non_zero_naming_the_repo(model, hub, monkeypatch, capsys, where):
    def fail(self, *args, **kwargs):
        raise HfHubHTTPError("403 Forbidden: no write access",
                             response=SimpleNamespace(headers={}, request=None))
    monkeypatch.setattr(push_cli.HfApi, where, fail)
    with pytest.raises(SystemExit) as exc:
        push_cli.main([str(model[0]), REPO_ID])
    err = capsys.readouterr().err
    assert exc.value.code == 1
    assert REPO_ID in err and "403 Forbidden: no write access" in err and "HfHubHTTPError" in err
    assert ("creating the repo" if where == "create_repo" else "uploading") in err


def test_offline_mode_is_named(model, hub, monkeypatch, capsys):
    def offline(self, *args, **kwargs):
        raise OfflineModeIsEnabled("Cannot reach https://huggingface.co: offline mode")
    monkeypatch.setattr(push_cli.HfApi, "create_repo", offline)
    with pytest.raises(SystemExit) as exc:
        push_cli.main([str(model[0]), REPO_ID])
    err = capsys.readouterr().err
    assert exc.value.code == 1 and REPO_ID in err and "HF_HUB_OFFLINE=1" in err


def test_the_real_client_in_offline_mode_fails_before_any_request(model, monkeypatch, capsys):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # huggingface_hub reads it per request
    with pytest.raises(SystemExit) as exc:
        push_cli.main([str(model[0]), REPO_ID, "--token", "hf_fake"])
    err = capsys.readouterr().err
    assert exc.value.code == 1 and REPO_ID in err and "offline mode is on" in err
