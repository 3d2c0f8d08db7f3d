"""Data-name resolution: explicit path, $TWOTOWER_DATA, download (never the real network)."""

import io
import re
import urllib.error
import zipfile

import pytest

from tests.fixtures_data import make_beir, write_text
from twotower.common.data import DataNotFoundError, load_beir
from twotower.common.data import resolve as resolve_module
from twotower.common.data import resolve_data


@pytest.fixture(autouse=True)
def no_network(monkeypatch, tmp_path):
    """Any real download attempt fails the test; the cache lives in tmp_path."""
    def refuse(*args, **kwargs):
        raise AssertionError("a test tried to use the network")

    monkeypatch.setattr(resolve_module.urllib.request, "urlopen", refuse)
    monkeypatch.setenv("TWOTOWER_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("TWOTOWER_DATA", raising=False)


def test_explicit_path_wins(tmp_path, monkeypatch):
    here = write_text(tmp_path / "work" / "scifact" / "corpus.jsonl", "{}")
    data = tmp_path / "data"
    write_text(data / "scifact" / "corpus.jsonl", "{}")
    monkeypatch.setenv("TWOTOWER_DATA", str(data))
    assert resolve_data(here) == here
    monkeypatch.chdir(tmp_path / "work")
    assert resolve_data("scifact/corpus.jsonl").resolve() == here.resolve()


def test_env_var(tmp_path, monkeypatch):
    data = tmp_path / "data"
    make_beir(data / "tiny")
    monkeypatch.setenv("TWOTOWER_DATA", str(data))
    assert resolve_data("tiny") == data / "tiny"
    assert resolve_data("tiny/qrels/test.tsv") == data / "tiny" / "qrels" / "test.tsv"
    assert load_beir("tiny", cache_dir=tmp_path / "hf").name == "tiny"


def test_unknown_name_says_what_was_tried(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataNotFoundError) as info:
        resolve_data("mydata/corpus.jsonl")
    message = str(info.value)
    assert message.startswith("data 'mydata/corpus.jsonl' not found. Tried:\n")
    assert f"1. path 'mydata/corpus.jsonl' (relative to {tmp_path}): does not exist" in message
    assert "2. $TWOTOWER_DATA/mydata/corpus.jsonl: TWOTOWER_DATA is not set" in message
    assert "3. download: 'mydata' is not a known BEIR dataset name" in message
    assert message.endswith("Set TWOTOWER_DATA to a folder containing mydata/corpus.jsonl, "
                            "or pass a path.")
    assert isinstance(info.value, ValueError)


def test_failing_download_is_reported(tmp_path, monkeypatch):
    calls = []

    def failing_download(name, dest_root):
        calls.append((name, dest_root))
        raise urllib.error.URLError("no network in tests")

    monkeypatch.setattr(resolve_module, "_download_beir", failing_download)
    monkeypatch.setenv("TWOTOWER_DATA", str(tmp_path / "data"))
    with pytest.raises(DataNotFoundError) as info:
        resolve_data("scifact")
    assert calls == [("scifact", tmp_path / "cache" / "beir")]
    message = str(info.value)
    expected_env = tmp_path / "data" / "scifact"
    assert f"2. $TWOTOWER_DATA/scifact = '{expected_env}': does not exist" in message
    assert re.search(r"3\. download https://public\.ukp\.informatik\.uni-darmstadt\.de/thakur/BEIR/"
                     r"datasets/scifact\.zip into '.*': failed \(URLError: <urlopen error no "
                     r"network in tests>\)", message)
    assert message.endswith("Set TWOTOWER_DATA to a folder containing scifact/, or pass a path.")


def test_download_disabled(monkeypatch):
    monkeypatch.setattr(resolve_module, "_download_beir", lambda *a: pytest.fail("downloaded"))
    with pytest.raises(DataNotFoundError, match=r"scifact\.zip: downloads are disabled"):
        resolve_data("scifact", download=False)


def _zip_bytes(files: dict[str, str]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, text in files.items():
            archive.writestr(name, text)
    return buffer.getvalue()


def test_download_unzips_into_cache_once(tmp_path, monkeypatch):
    payload = _zip_bytes({"scifact/corpus.jsonl": '{"_id": "1", "text": "x"}\n',
                          "scifact/qrels/test.tsv": "1\t1\t1\n"})
    urls = []

    def fake_urlopen(url, timeout):
        urls.append((url, timeout))
        return io.BytesIO(payload)

    monkeypatch.setattr(resolve_module.urllib.request, "urlopen", fake_urlopen)
    path = resolve_data("scifact/qrels/test.tsv")
    assert path == tmp_path / "cache" / "beir" / "scifact" / "qrels" / "test.tsv"
    assert path.read_text() == "1\t1\t1\n"
    assert resolve_data("scifact") == tmp_path / "cache" / "beir" / "scifact"  # no new download
    assert urls == [(resolve_module.BEIR_URL.format(name="scifact"),
                     resolve_module.DOWNLOAD_TIMEOUT_S)]
    assert [p.name for p in (tmp_path / "cache" / "beir").iterdir()] == ["scifact"]  # no temp


def test_download_of_an_unexpected_archive(tmp_path, monkeypatch):
    monkeypatch.setattr(resolve_module.urllib.request, "urlopen",
                        lambda url, timeout: io.BytesIO(_zip_bytes({"other/x.txt": "x"})))
    with pytest.raises(DataNotFoundError, match=r"failed \(DataError: the archive from .*"
                                                r"scifact\.zip has no top-level folder scifact/\)"):
        resolve_data("scifact")
    assert not (tmp_path / "cache" / "beir" / "scifact").exists()


def test_failing_hf_download_is_reported(monkeypatch):
    def failing(repo_id, dest_root):
        raise OSError("offline")

    monkeypatch.setattr(resolve_module, "_download_hf", failing)
    with pytest.raises(DataNotFoundError, match=r"Hugging Face dataset 'BeIR/scifact' into .*: "
                                                r"failed \(OSError: offline\)"):
        resolve_data("hf:BeIR/scifact")
