"""supra.data: sources, bad records, packing, sharding, held-out split and exact resume.

A small byte-level BPE tokenizer is trained here on a few strings (offline, milliseconds); byte-level
decoding is exact, so rows can be cut back into the documents they came from.
"""

from __future__ import annotations

import gzip
import io
import json
import logging
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from supra.data import (
    IGNORE_INDEX,
    DataConfig,
    DataError,
    MixtureComponent,
    Packer,
    as_data_config,
    build_train_loader,
    cu_seqlens,
    iter_documents,
    stdlib_documents,
)
from supra.data.loader import ShardStream
from supra.data.packing import batch_encoder

WORDS = ("alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma "
         "tau upsilon phi chi psi omega").split()


def make_tokenizer(chat_template: str | None = None) -> PreTrainedTokenizerFast:
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<eos>", "<bos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator([" ".join(WORDS)] * 3 + ["document number 0123456789 def return"], trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<eos>", bos_token="<bos>")
    if chat_template:
        tok.chat_template = chat_template
    return tok


@pytest.fixture(scope="module")
def tok() -> PreTrainedTokenizerFast:
    return make_tokenizer()


def doc_text(prefix: str, i: int) -> str:
    # Distinct texts of varied length (5..40 words), so documents straddle rows.
    words = [WORDS[(i * 7 + j * 3) % len(WORDS)] for j in range(5 + (i * 13) % 36)]
    return f"{prefix} document {i}: " + " ".join(words)


def write_jsonl(path: Path, texts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return path


@pytest.fixture
def corpus(tmp_path: Path) -> tuple[Path, list[str]]:
    """60 documents over three jsonl files and a folder of txt files."""
    texts = [doc_text("c", i) for i in range(60)]
    root = tmp_path / "corpus"
    (root / "txt").mkdir(parents=True)
    write_jsonl(root / "a.jsonl", texts[:20])
    write_jsonl(root / "b.jsonl", texts[20:35])
    write_jsonl(root / "c.jsonl", texts[35:50])
    for i, t in enumerate(texts[50:]):
        (root / "txt" / f"{i:02d}.txt").write_text(t)
    return root, texts


def split_docs(rows: list[torch.Tensor], tok: PreTrainedTokenizerFast) -> list[str]:
    """Complete documents in consecutive rows of one stream (eos separator)."""
    ids = torch.cat([r.reshape(-1) for r in rows]).tolist()
    docs, current = [], []
    for t in ids:
        if t == tok.eos_token_id:
            docs.append(tok.decode(current))
            current = []
        else:
            current.append(t)
    return docs  # the unfinished last document is left out


def take(loader, n: int) -> list[dict[str, torch.Tensor]]:
    it = iter(loader)
    return [next(it) for _ in range(n)]


# ------------------------------------------------------------------------------------------ packing

def test_packing_round_trip_positions_and_labels(tok):
    texts = [doc_text("p", i) for i in range(12)]
    packer = Packer(tok, seq_len=16, separator="eos")
    packer.add(texts[:5])
    packer.add(texts[5:])
    rows = []
    while (batch := packer.take(2)) is not None:
        rows.append(batch)
    expected, positions = [], []
    for t in texts:
        ids = tok(t, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        expected += ids
        positions += list(range(len(ids)))
    got = [t for b in rows for t in b["input_ids"].reshape(-1).tolist()] + packer.ids.tolist()
    assert got == expected  # nothing lost, reordered or padded; the leftover is the tail
    got_pos = [p for b in rows for p in b["position_ids"].reshape(-1).tolist()] + packer.positions.tolist()
    assert got_pos == positions
    for b in rows:
        assert (b["labels"][b["position_ids"] == 0] == IGNORE_INDEX).all()
        keep = b["position_ids"] != 0
        assert (b["labels"][keep] == b["input_ids"][keep]).all()
    # a row that starts mid-document continues its positions
    assert any(b["position_ids"][r, 0] > 0 for b in rows for r in range(2))


def test_bos_separator_and_cu_seqlens(tok):
    packer = Packer(tok, seq_len=8, separator="bos")
    packer.add(["alpha beta", "gamma"])
    ids = packer.ids.tolist()
    assert ids[0] == tok.bos_token_id and packer.positions[0] == 0
    second = ids.index(tok.bos_token_id, 1)
    assert packer.positions[second] == 0 and packer.positions[second - 1] == second - 1
    pos = torch.tensor([[0, 1, 2, 0, 1], [2, 3, 0, 1, 2]])
    assert cu_seqlens(pos).tolist() == [0, 3, 5, 7, 10]


def test_separator_fallback_and_fast_encoder(tok, caplog):
    no_eos = make_tokenizer()
    no_eos.eos_token = None
    with caplog.at_level(logging.WARNING):
        packer = Packer(no_eos, seq_len=4, separator="eos")
    assert packer.mode == "bos" and "no EOS token" in caplog.text
    texts = [doc_text("f", i) for i in range(5)] + ["<eos> inside text", ""]
    assert batch_encoder(tok)(texts) == tok(texts, add_special_tokens=False)["input_ids"]


# ---------------------------------------------------------------------------------- sources, split

def test_all_local_formats_and_key_stability(tmp_path, tok):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "one.txt").write_text("plain text file")
    with gzip.open(tmp_path / "d" / "two.jsonl.gz", "wt") as fh:
        fh.write(json.dumps({"body": "gz line"}) + "\n")
    (tmp_path / "d" / "three.json").write_text(json.dumps([{"body": "json row 0"}, {"body": "json row 1"}]))
    pq.write_table(pa.table({"body": ["parquet row 0", "parquet row 1"]}), tmp_path / "d" / "four.parquet")
    cfg = DataConfig(source=str(tmp_path / "d"), text_field="body", heldout_fraction=0.0)
    docs = list(iter_documents(cfg, "train"))
    # sorted by path: four.parquet, one.txt, three.json, two.jsonl.gz
    assert docs == ["parquet row 0", "parquet row 1", "plain text file", "json row 0", "json row 1", "gz line"]
    glob_cfg = DataConfig(source=str(tmp_path / "d" / "*.json*"), text_field="body", heldout_fraction=0.0)
    assert list(iter_documents(glob_cfg)) == ["json row 0", "json row 1", "gz line"]


def test_stdlib_source(tok):
    heldout = list(iter_documents(DataConfig(), "heldout"))
    assert heldout and heldout == list(stdlib_documents("heldout"))
    loader = build_train_loader(DataConfig(max_documents=40, shuffle_buffer=8), tok, seq_len=64, batch_size=2)
    batch = next(iter(loader))
    assert {k: tuple(v.shape) for k, v in batch.items()} == {k: (2, 64) for k in
                                                            ("input_ids", "labels", "position_ids")}
    assert batch["input_ids"].dtype == torch.int64
    assert loader.stats()["documents"] > 0


def test_heldout_never_in_training_rows(corpus, tok):
    root, texts = corpus
    cfg = DataConfig(source=str(root), heldout_fraction=0.25, shuffle_buffer=4)
    heldout = set(iter_documents(cfg, "heldout"))
    train = set(iter_documents(cfg, "train"))
    assert heldout and train and not heldout & train and heldout | train == set(texts)
    loader = build_train_loader(cfg, tok, seq_len=32, batch_size=4)
    seen = set(split_docs([b["input_ids"] for b in take(loader, 40)], tok))
    assert seen == train  # several epochs read: every training document, no held-out one
    assert loader.stats()["heldout_excluded"] >= len(heldout)


def test_ranks_and_workers_disjoint_and_complete(corpus, tok):
    root, texts = corpus
    cfg = DataConfig(source=str(root), heldout_fraction=0.1, shuffle_buffer=3, num_workers=2, seed=3)
    train = set(iter_documents(cfg, "train"))
    per_stream = []
    for rank in range(2):
        loader = build_train_loader(cfg, tok, seq_len=32, batch_size=2, rank=rank, world_size=2)
        batches = take(loader, 48)
        for k in range(2):  # batches alternate between the two workers' streams
            per_stream.append(set(split_docs([b["input_ids"] for b in batches[k::2]], tok)))
    assert all(per_stream)
    for i in range(4):
        for j in range(i + 1, 4):
            assert not per_stream[i] & per_stream[j]
    assert set().union(*per_stream) == train


def test_mixture_weights(tmp_path, tok):
    a = write_jsonl(tmp_path / "a.jsonl", [doc_text("A", i) for i in range(50)])
    b = write_jsonl(tmp_path / "b.jsonl", [doc_text("B", i) for i in range(50)])
    cfg = as_data_config(DataConfig(mixture=[MixtureComponent(str(a), weight=3.0),
                                             MixtureComponent(str(b), weight=1.0)], heldout_fraction=0.0))
    stream = ShardStream(cfg, tok, seq_len=16, shard=0, num_shards=1)
    picks = [stream._next_document()[0] for _ in range(4000)]
    share = picks.count("A") / len(picks)
    assert 0.72 < share < 0.78
    assert sorted(set(iter_documents(cfg))) == sorted(doc_text(p, i) for p in "AB" for i in range(50))


def test_alpaca_and_chat_formatting(tmp_path):
    rows = [{"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
            {"instruction": "Say hi.", "input": "", "output": "hi"},
            {"messages": [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "A."}]}]
    path = tmp_path / "alpaca.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = DataConfig(source=str(path), heldout_fraction=0.0)
    plain = list(iter_documents(cfg))
    assert plain[0] == "### Instruction:\nAdd the numbers.\n\n### Input:\n2 and 3\n\n### Response:\n5"
    assert plain[1] == "### Instruction:\nSay hi.\n\n### Response:\nhi"
    assert plain[2] == "### User:\nQ?\n\n### Assistant:\nA."
    templ = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<eos>{% endfor %}")
    templated = list(iter_documents(cfg, tokenizer=make_tokenizer(chat_template=templ)))
    assert templated[0] == "<|user|>Add the numbers.\n\n2 and 3<eos><|assistant|>5<eos>"
    with pytest.raises(DataError, match="missing|no string field"):
        list(iter_documents(DataConfig(source=str(path), format="text", on_bad_record="error",
                                       heldout_fraction=0.0)))


def test_hub_code_path_with_local_json(tmp_path, tok, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    texts = [doc_text("h", i) for i in range(40)]
    path = write_jsonl(tmp_path / "hub.jsonl", texts)
    cfg = DataConfig(source="hf:json", hf_data_files=str(path), heldout_fraction=0.2, shuffle_buffer=0)
    heldout, train = set(iter_documents(cfg, "heldout")), set(iter_documents(cfg, "train"))
    assert heldout and not heldout & train and heldout | train == set(texts)
    seen = []
    for rank in range(2):
        loader = build_train_loader(cfg, tok, seq_len=32, batch_size=2, rank=rank, world_size=2)
        seen.append(set(split_docs([b["input_ids"] for b in take(loader, 30)], tok)))
    assert not seen[0] & seen[1] and seen[0] | seen[1] == train
    with pytest.raises(DataError, match="cannot open hub dataset"):
        iter_documents(DataConfig(source="hf:json", hf_data_files=str(tmp_path / "nope.jsonl")))


# ------------------------------------------------------------------------------------------ resume

@pytest.mark.parametrize("workers", [0, 2])
def test_resume_is_bit_exact(corpus, tok, workers):
    root, _ = corpus
    other = write_jsonl(root.parent / "other.jsonl", [doc_text("o", i) for i in range(30)])
    cfg = DataConfig(mixture=[MixtureComponent(str(root), 2.0), MixtureComponent(str(other), 1.0)],
                     shuffle_buffer=5, num_workers=workers, seed=7, heldout_fraction=0.1)
    reference = take(build_train_loader(cfg, tok, seq_len=24, batch_size=3), 30)  # > 1 epoch
    first = build_train_loader(cfg, tok, seq_len=24, batch_size=3)
    it = iter(first)
    for _ in range(7):  # odd, so the next batch comes from the second worker
        next(it)
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    resumed = build_train_loader(cfg, tok, seq_len=24, batch_size=3)
    resumed.load_state_dict(state)
    for want, got in zip(reference[7:], take(resumed, 23)):
        for key in want:
            assert torch.equal(want[key], got[key]), key
    # the first loader, iterated again, also carries on after its last batch
    assert torch.equal(next(iter(first))["input_ids"], reference[7]["input_ids"])


def test_resume_refuses_other_world_size_or_settings(corpus, tok):
    root, _ = corpus
    cfg = DataConfig(source=str(root), num_workers=0)
    loader = build_train_loader(cfg, tok, seq_len=16, batch_size=2, rank=0, world_size=2)
    take(loader, 2)
    state = loader.state_dict()
    with pytest.raises(DataError, match="world_size=2.*world_size=1"):
        build_train_loader(cfg, tok, seq_len=16, batch_size=2).load_state_dict(state)
    with pytest.raises(DataError, match="num_workers"):
        build_train_loader(DataConfig(source=str(root), num_workers=2), tok, 16, 2, 0, 2).load_state_dict(state)
    with pytest.raises(DataError, match="seed"):
        build_train_loader(DataConfig(source=str(root), seed=1), tok, 16, 2, 0, 2).load_state_dict(state)


# ---------------------------------------------------------------------------------------- bad data

def test_missing_path_is_one_clear_error(tmp_path, tok):
    missing = tmp_path / "nowhere.jsonl"
    with pytest.raises(DataError, match="nowhere.jsonl.*not found.*valid: 'stdlib'"):
        build_train_loader(DataConfig(source=str(missing)), tok, 16, 2)
    with pytest.raises(DataError, match="matches no files"):
        iter_documents(DataConfig(source=str(tmp_path / "*.parquet")))


def bad_corpus(tmp_path: Path) -> Path:
    root = tmp_path / "bad"
    root.mkdir()
    (root / "empty.txt").write_text("")
    (root / "empty.jsonl").write_text("")
    (root / "latin1.txt").write_bytes("caf\u00e9".encode("latin-1"))
    lines = [json.dumps({"text": "good one"}), "{not json", json.dumps({"body": "no text field"}), "",
             json.dumps({"text": "good two"})]
    (root / "mixed.jsonl").write_bytes(("\n".join(lines) + "\n").encode() + b'{"text": "\xff\xfe"}\n')
    (root / "ok.txt").write_text("good three")
    return root


def test_bad_records_are_skipped_and_counted(tmp_path, tok, caplog):
    root = bad_corpus(tmp_path)
    cfg = DataConfig(source=str(root), heldout_fraction=0.0, shuffle_buffer=0)
    with caplog.at_level(logging.WARNING):
        assert list(iter_documents(cfg)) == ["good one", "good two", "good three"]
    assert "mixed.jsonl:2" in caplog.text and "not JSON" in caplog.text
    loader = build_train_loader(cfg, tok, seq_len=8, batch_size=1)
    take(loader, 3)
    stats = loader.stats()
    assert stats["skipped_empty"] == 3  # empty.txt, empty.jsonl, the blank line
    assert stats["skipped_undecodable"] == 2  # latin1.txt, the \xff line
    assert stats["skipped_bad_json"] == 1 and stats["skipped_missing_field"] == 1
    assert stats["skipped"] == 7 and stats["documents"] >= 3


@pytest.mark.parametrize("name, content, message", [
    ("e.txt", b"", "e.txt: empty file"),
    ("u.txt", b"\xff\xfe\xfa", "u.txt: invalid UTF-8"),
    ("j.jsonl", b'{"text": "ok"}\n{oops\n', "j.jsonl:2: not JSON"),
    ("m.jsonl", b'{"body": "x"}\n', "m.jsonl:1: no string field 'text'"),
])
def test_bad_record_error_mode(tmp_path, name, content, message):
    (tmp_path / name).write_bytes(content)
    cfg = DataConfig(source=str(tmp_path / name), on_bad_record="error", heldout_fraction=0.0)
    with pytest.raises(DataError, match=message) as info:
        list(iter_documents(cfg))
    assert "\n" not in str(info.value)


def test_shard_without_documents_is_an_error(tmp_path, tok):
    path = write_jsonl(tmp_path / "tiny.jsonl", ["only one document"])
    loader = build_train_loader(DataConfig(source=str(path), heldout_fraction=0.0), tok, 8, 1, rank=1,
                                world_size=2)
    with pytest.raises(DataError, match="no train documents for shard 1 of 2"):
        next(iter(loader))


# ------------------------------------------------------------------------------------------ config

def test_structured_config_and_validation():
    base = OmegaConf.structured(DataConfig)
    merged = OmegaConf.merge(base, {"mixture": [{"source": "stdlib", "weight": 2}], "num_workers": 2})
    cfg = as_data_config(merged.copy())
    assert isinstance(cfg, DataConfig) and cfg.mixture[0].weight == 2.0 and cfg.num_workers == 2
    assert as_data_config({"source": "x", "mixture": [{"source": "y"}]}).mixture[0].source == "y"
    with pytest.raises(DataError, match="format.*valid: auto, text, chat"):
        as_data_config(DataConfig(format="markdown"))
    with pytest.raises(DataError, match="unknown data settings"):
        as_data_config({"sauce": "x"})
