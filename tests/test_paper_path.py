"""Silent errors of the paper-recipe path: data resolution (named files or an error, never a
silent BEIR download), separate-tower export through sentence-transformers' Router, MoCo with
separate towers refused, every model checked before any long step, and multi-process data
preparation done once (tokenisation, BM25) with the 1-process result. Tiny random models with the
bundled tokenizer, tiny synthetic data in tmp_path."""
import json
import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
from accelerate import PartialState

import twotower.common.eval.bm25
import twotower.finetune.run as ft_run
import twotower.pretrain.chunks
from tests.dist_utils import run_distributed
from twotower.common.data import DataNotFoundError
from twotower.common.data import resolve as resolve_module
from twotower.common.model.encoder import Encoder, tiny_bert
from twotower.common.recipe.config import RecipeError, load_recipe
from twotower.finetune.args import DataArgs, FinetuneRecipe, PseudoArgs, TeacherArgs
from twotower.finetune.pseudo import pseudo_label_pool
from twotower.finetune.sources import build_pool
from twotower.pretrain.args import MethodArgs, PretrainRecipe
from twotower.pretrain.dataset import build_pair_dataset
from twotower.pretrain.losses import build_method

TOPICS = ["protein", "river", "planet", "market", "vaccine", "storm"]


@pytest.fixture(autouse=True)
def no_download(monkeypatch, tmp_path):
    """Any download attempt is recorded and fails; the cache lives in tmp_path."""
    calls = []

    def refuse(name, dest_root):
        calls.append(name)
        raise OSError("no network in tests")

    monkeypatch.setattr(resolve_module, "_download_beir", refuse)
    monkeypatch.setenv("TWOTOWER_CACHE", str(tmp_path / "cache"))
    return calls


def write_corpus(folder: Path) -> dict:
    folder.mkdir(parents=True, exist_ok=True)
    docs = {f"{t}{i}": f"{t} facts " + "x " * i + f"doc {i}" for t in TOPICS for i in range(5)}
    (folder / "corpus.jsonl").write_text("".join(
        json.dumps({"_id": k, "title": "", "text": v}) + "\n" for k, v in docs.items()))
    return docs


class RecordingTeacher:
    """Scores a pair 5.0 when the passage starts with the query's topic, else -5.0; records every
    query text it is shown."""

    def __init__(self):
        self.args, self.seen = TeacherArgs(model="recording"), []

    def score(self, queries, passages):
        self.seen += list(queries)
        return np.array([5.0 if p.split()[0] == q.split()[0] else -5.0
                         for q, p in zip(queries, passages)])


# ------------------------------------------------------------------------ 1. data resolution
def test_pseudo_labelling_reads_exactly_data_queries(tmp_path):
    folder = tmp_path / "beirlike"
    write_corpus(folder)
    dev = {"_id": "dev1", "text": "storm dev question never to be trained on"}
    (folder / "queries.jsonl").write_text(json.dumps(dev) + "\n" + "".join(
        json.dumps({"_id": f"t{i}", "text": f"{t} facts"}) + "\n" for i, t in enumerate(TOPICS)))
    (folder / "queries.train.tsv").write_text("".join(
        f"t{i}\t{t} facts\n" for i, t in enumerate(TOPICS[:3])))
    data = DataArgs(kind="pseudo", path=str(folder), queries="queries.train.tsv",
                    pseudo=PseudoArgs(candidates="bm25", top_k=5, pos_threshold=0.9,
                                      neg_threshold=0.1))
    teacher = RecordingTeacher()
    pool = pseudo_label_pool(data, teacher)
    assert dev["text"] not in teacher.seen
    assert sorted({g.qid for g in pool.groups}) == ["t0", "t1", "t2"]


def test_a_named_file_that_is_missing_is_an_error_naming_it_and_the_root(tmp_path, monkeypatch,
                                                                         no_download):
    root = tmp_path / "data"
    root.mkdir()
    monkeypatch.setenv("TWOTOWER_DATA", str(root))
    # no $TWOTOWER_DATA/msmarco: BEIR's msmarco zip has no queries.train.tsv -> no download
    data = DataArgs(kind="pseudo", path="msmarco", queries="queries.train.tsv")
    with pytest.raises(DataNotFoundError) as info:
        build_pool(data, teacher=RecordingTeacher())
    message = str(info.value)
    assert "data.queries" in message and "queries.train.tsv" in message
    assert str(root / "msmarco") in message
    assert no_download == []
    # a local folder without the named file: the same error, naming that folder
    write_corpus(root / "msmarco")
    (root / "msmarco" / "queries.jsonl").write_text('{"_id": "dev1", "text": "storm dev"}\n')
    with pytest.raises(DataNotFoundError, match=r"data\.queries='queries\.train\.tsv'") as info:
        build_pool(data, teacher=RecordingTeacher())
    assert str(root / "msmarco") in str(info.value)
    msmarco = DataArgs(kind="msmarco", path="msmarco", collection="collection.train.tsv")
    with pytest.raises(DataNotFoundError, match=r"data\.collection='collection\.train\.tsv'"):
        build_pool(msmarco)
    assert no_download == []


def test_a_beir_name_still_downloads_and_a_failure_is_reported(tmp_path, monkeypatch,
                                                               no_download):
    monkeypatch.setenv("TWOTOWER_DATA", str(tmp_path / "data"))
    data = DataArgs(kind="beir", path="scifact")
    with pytest.raises(DataNotFoundError, match=r"scifact\.zip into .*: failed \(OSError: no "
                                                r"network in tests\)"):
        build_pool(data)
    assert no_download == ["scifact"]


# ------------------------------------------------------------------ 2. separate-tower export
def test_separate_towers_export_routes_documents_to_the_doc_tower(tmp_path):
    from sentence_transformers import SentenceTransformer

    enc = tiny_bert(dropout=0.0, normalize=True, shared_tower=False, query_prefix="q: ",
                    doc_prefix="d: ")
    with torch.no_grad():
        for p in enc.doc_model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    texts = ["what do cats eat", "Giraffes grow to about five metres tall.", "rivers"]
    q = enc.encode(texts, progress=False)
    d = enc.encode(texts, tower="doc", progress=False)
    assert np.abs(q - d).max() > 1e-2  # the towers differ
    enc.save(tmp_path / "model")
    st = SentenceTransformer(str(tmp_path / "model"), device="cpu")
    np.testing.assert_allclose(st.encode_query(texts, convert_to_numpy=True), q, atol=1e-5)
    np.testing.assert_allclose(st.encode_document(texts, convert_to_numpy=True), d, atol=1e-5)
    again = Encoder.load(str(tmp_path / "model"))
    assert again.doc_model is not None and again.args.query_prefix == "q: "
    np.testing.assert_allclose(again.encode(texts, progress=False), q, atol=1e-5)
    np.testing.assert_allclose(again.encode(texts, tower="doc", progress=False), d, atol=1e-5)


# ---------------------------------------------------------------- 3. MoCo with two towers
def test_moco_with_separate_towers_is_refused():
    with pytest.raises(RecipeError, match=r"model\.shared_tower.*method\.name"):
        load_recipe(PretrainRecipe, "contriever_cpu", ["model.shared_tower=false"])
    load_recipe(PretrainRecipe, "contriever_inbatch_cpu", ["model.shared_tower=false"])  # fine
    encoder = tiny_bert(hidden=16, layers=1, shared_tower=False)
    with pytest.raises(RecipeError, match=r"model\.shared_tower.*method\.name"):
        build_method(encoder, MethodArgs(name="moco", queue_size=8), 1, seed=0)


# -------------------------------------------------------------------- 4. models checked first
@pytest.mark.parametrize("key,override", [
    ("teacher.model", "teacher.model=no-such-org/no-such-cross-encoder"),
    ("teacher.model", "teacher.model=/no/such/teacher"),
    ("model.name_or_path", "model.name_or_path=/no/such/student"),
])
def test_a_missing_model_fails_before_any_bm25(tmp_path, monkeypatch, key, override):
    folder = tmp_path / "beirlike"
    write_corpus(folder)
    (folder / "queries.jsonl").write_text("".join(
        json.dumps({"_id": f"t{i}", "text": f"{t} facts"}) + "\n" for i, t in enumerate(TOPICS)))
    tiny_bert(dropout=0.0).save(tmp_path / "student")

    def no_bm25(*args, **kwargs):
        raise AssertionError("a BM25 index was built before the models were checked")

    monkeypatch.setattr(twotower.common.eval.bm25.BM25Index, "__init__", no_bm25)
    argv = ["--recipe", "pair_two_stage_cpu", f"model.name_or_path={tmp_path / 'student'}",
            f"train.output_dir={tmp_path / 'out'}", "eval.data=",
            f"stages.pseudo.data.path={folder}", "stages.pseudo.data.queries=queries.jsonl",
            "stages.pseudo.data.pseudo.candidates=bm25", override]
    with pytest.raises(Exception, match=key.replace(".", r"\.")) as info:
        ft_run.main(argv)
    assert "BM25" not in str(info.value)


# ------------------------------------------------------- 5. multi-process data preparation
def _log_rank(path: Path, rank: int) -> None:
    with open(path, "a") as f:
        f.write(f"{rank}\n")


def _prepare(rank: int, world: int, root: str) -> dict:
    """Pretraining tokens, a pseudo-labelled pool (BM25 candidates) and a BM25-mined pool, on
    this process; every tokenisation and every BM25 index built is logged with the rank."""
    root = Path(root)
    torch.set_num_threads(1)
    if world > 1:  # Accelerate joins the process group run_distributed started
        os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world))
        PartialState(cpu=True)
    tokenize, index = twotower.pretrain.chunks._Tokenize.__call__, twotower.common.eval.bm25.BM25Index.__init__

    def logged_tokenize(self, batch):
        _log_rank(root / "tokenized", rank)
        time.sleep(0.5)  # a second process arriving meanwhile would tokenise too
        return tokenize(self, batch)

    def logged_index(self, *args, **kwargs):
        _log_rank(root / "bm25", rank)
        return index(self, *args, **kwargs)

    twotower.pretrain.chunks._Tokenize.__call__ = logged_tokenize
    twotower.common.eval.bm25.BM25Index.__init__ = logged_index
    recipe = load_recipe(PretrainRecipe, None, [
        f"data.corpora=[{root / 'corpus' / 'corpus.jsonl'}]", f"data.cache_dir={root / 'tok'}",
        "pairs.chunk_length=8"])
    dataset, _ = build_pair_dataset(recipe, tiny_bert(hidden=16, layers=1))
    stream = dataset.chunker.stream
    ft = load_recipe(FinetuneRecipe, "pair_two_stage_cpu", [
        f"model.name_or_path={root / 'student'}", f"teacher.model={root / 'student'}",
        f"train.output_dir={root / 'out'}", "eval.data=",
        f"stages.pseudo.data.path={root / 'corpus'}", "stages.pseudo.data.queries=queries.jsonl",
        "stages.pseudo.data.pseudo={candidates: bm25, top_k: 5, pos_threshold: -1.0, "
        "neg_threshold: -2.0, apply_sigmoid: false}", "stages.pseudo.data.max_queries=0",
        "stages.labelled.data.kind=beir", f"stages.labelled.data.path={root / 'corpus'}",
        "stages.labelled.data.hard_negatives=", "stages.labelled.data.mine.retriever=bm25",
        "stages.labelled.data.mine.n=3"])
    pools = {}
    for name, stage in ft.stage_list():
        _, dataset, _ = ft_run.build_stage(ft, stage, str(root / "student"), world)
        pools[name] = sorted((g.qid, tuple(g.positives), tuple(g.negatives))
                             for g in dataset.pool.groups)
    return {"stream": stream.tolist(), "pools": pools}


@pytest.fixture
def prep_root(tmp_path):
    folder = tmp_path / "corpus"
    write_corpus(folder)
    (folder / "queries.jsonl").write_text("".join(
        json.dumps({"_id": f"t{i}", "text": f"{t} facts"}) + "\n" for i, t in enumerate(TOPICS)))
    (folder / "qrels").mkdir()
    (folder / "qrels" / "train.tsv").write_text("query-id\tcorpus-id\tscore\n" + "".join(
        f"t{i}\t{t}0\t1\n" for i, t in enumerate(TOPICS)))
    tiny_bert(dropout=0.0, normalize=True).save(tmp_path / "student")
    return tmp_path


def test_two_processes_tokenise_and_build_bm25_once(prep_root):
    results = run_distributed(_prepare, world=2, args=(str(prep_root),))
    ranks = (prep_root / "tokenized").read_text().split()
    assert set(ranks) == {"0"}, f"tokenised by ranks {sorted(set(ranks))}"
    assert (prep_root / "bm25").read_text().split() == ["0", "0"]  # pseudo, then mining
    assert results[0] == results[1]
    for name in ("tokenized", "bm25"):
        (prep_root / name).unlink()
    single = _prepare_single(prep_root)
    assert single == results[0]
    assert all(single["pools"].values())


def _prepare_single(root: Path) -> dict:
    """_prepare on this one process, undoing its patches and environment after."""
    assert not dist.is_initialized()
    saved = dict(os.environ)
    tokenize, index = twotower.pretrain.chunks._Tokenize.__call__, twotower.common.eval.bm25.BM25Index.__init__
    try:
        return _prepare(0, 1, str(root))
    finally:
        twotower.pretrain.chunks._Tokenize.__call__, twotower.common.eval.bm25.BM25Index.__init__ = tokenize, index
        os.environ.clear()
        os.environ.update(saved)
