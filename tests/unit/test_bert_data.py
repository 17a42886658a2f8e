"""BERT pretraining samples (layout, masking, pair tasks, determinism) and the MIMIC note readers."""

import gzip

import numpy as np
import pytest

from tests.conftest import run_cli
from toolkit.data import IndexedDataset, IndexedDatasetWriter, PretrainingSampler, preprocess
from toolkit.data.bert_dataset import BertDataset, BertTokenInfo, build_bert_datasets, build_segments
from toolkit.data.readers import iter_csv_notes, iter_documents
from toolkit.errors import DataError

PAD, UNK, CLS, SEP, MASK, DOT = 0, 1, 2, 3, 4, 5
VOCAB = 1000
CONT = np.zeros(VOCAB, dtype=bool)
CONT[np.arange(VOCAB) % 3 == 1] = True  # ids ≡ 1 (mod 3) are "##" continuation pieces
CONT[:10] = False
INFO = BertTokenInfo(cls_id=CLS, sep_id=SEP, mask_id=MASK, pad_id=PAD, vocab_size=VOCAB, eod_id=SEP,
                     boundary_ids=(DOT,), continuation=CONT, special_ids=(PAD, UNK, CLS, SEP, MASK))


def doc_tokens(d: int, sentences: int = 4, words: int = 5) -> list[int]:
    """Document ``d``: ids from its own range [10 + 24d, …), increasing, '.' after each sentence, EOD last."""
    out, t = [], 10 + 24 * d
    for _ in range(sentences):
        out += list(range(t, t + words)) + [DOT]
        t += words
    return out + [SEP]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> str:
    prefix = str(tmp_path_factory.mktemp("bert") / "docs")
    with IndexedDatasetWriter(prefix, np.uint16, vocab_size=VOCAB) as w:
        for d in range(40):
            w.add_document(doc_tokens(d, sentences=2 + d % 3))
    return prefix


@pytest.fixture(scope="module")
def long_corpus(tmp_path_factory) -> str:
    """Long documents (ids wrap within [10, 1000)), so samples fill seq_length and rounding is small."""
    prefix = str(tmp_path_factory.mktemp("bert-long") / "docs")
    with IndexedDatasetWriter(prefix, np.uint16, vocab_size=VOCAB) as w:
        for d in range(30):
            w.add_document([10 + (t - 10) % 990 if t != DOT and t != SEP else t
                            for t in doc_tokens(d, sentences=30)])
    return prefix


def make(corpus, tmp_path, n=400, seq=64, **kw) -> BertDataset:
    ds = IndexedDataset(corpus)
    return BertDataset(ds, np.arange(len(ds)), n, seq, 7, INFO, cache_dir=tmp_path, **kw)


def unmasked(sample) -> np.ndarray:
    return np.where(sample["labels"] != -100, sample["labels"], sample["tokens"])


def segments_of(sample) -> tuple[list[int], list[int]]:
    toks, n = unmasked(sample), int(sample["padding_mask"].sum())
    seps = [k for k in range(n) if toks[k] == SEP]
    return toks[1:seps[0]].tolist(), toks[seps[0] + 1:seps[1]].tolist()


def test_segments_split_at_sentence_ends_and_cap(corpus):
    ds = IndexedDataset(corpus)
    table, first = build_segments(ds, np.arange(2), INFO, max_segment_tokens=4)
    assert first.tolist() == [0, 4, 10]  # doc 0: 2 sentences of 6 → 2+2 chunks; doc 1: 3 sentences → 6
    assert table[:4].tolist() == [[0, 0, 4], [0, 4, 2], [0, 6, 4], [0, 10, 2]]  # EOD (offset 12) dropped


def test_layout_types_and_padding(corpus, tmp_path):
    ds = make(corpus, tmp_path)
    for i in range(50):
        s = ds[i]
        n = int(s["padding_mask"].sum())
        toks = unmasked(s)
        assert toks[0] == CLS and toks[n - 1] == SEP and (toks[n:] == PAD).all() and (s["padding_mask"][:n] == 1).all()
        sep1 = int(np.flatnonzero(toks == SEP)[0])
        assert (s["token_types"][:sep1 + 1] == 0).all() and (s["token_types"][sep1 + 1:n] == 1).all()
        assert (s["token_types"][n:] == 0).all()
        assert (s["labels"][[0, sep1, n - 1]] == -100).all() and (s["labels"][n:] == -100).all()
        assert s["tokens"].dtype == np.int64 and s["tokens"].shape == (64,) and s["is_random"] in (0, 1)
        a, b = segments_of(s)
        assert a and b


def test_single_segment_without_binary_head(corpus, tmp_path):
    ds = make(corpus, tmp_path, binary_head=False)
    for i in range(30):
        s = ds[i]
        n = int(s["padding_mask"].sum())
        toks = unmasked(s)
        assert toks[0] == CLS and toks[n - 1] == SEP and SEP not in toks[1:n - 1].tolist()
        assert (s["token_types"] == 0).all() and s["is_random"] == 0


def test_sentence_order_task(corpus, tmp_path):
    ds = make(corpus, tmp_path, pair_task="sop")
    labels = []
    for i in range(200):
        a, b = segments_of(ds[i])
        a, b = [t for t in a if t != DOT], [t for t in b if t != DOT]
        labels.append(int(ds[i]["is_random"]))
        assert (max(a) < min(b)) == (labels[-1] == 0)  # swapped exactly when labelled random
        assert (max(a) - 10) // 24 == (min(b) - 10) // 24  # same document
    assert 0.4 < np.mean(labels) < 0.6


def test_next_sentence_task(corpus, tmp_path):
    ds = make(corpus, tmp_path, pair_task="nsp")
    for i in range(200):
        a, b = segments_of(ds[i])
        same_doc = {(t - 10) // 24 for t in a if t != DOT} == {(t - 10) // 24 for t in b if t != DOT}
        assert same_doc == (ds[i]["is_random"] == 0)


def test_truncation_to_seq_length(corpus, tmp_path):
    ds = make(corpus, tmp_path, seq=12, n=100)
    for i in range(100):
        s = ds[i]
        assert s["padding_mask"].sum() <= 12 and unmasked(s)[0] == CLS


def test_masking_rates(long_corpus, tmp_path):
    ds = make(long_corpus, tmp_path, n=600, seq=128)
    cand = masked = as_mask = kept = rand = 0
    for i in range(600):
        s = ds[i]
        n = int(s["padding_mask"].sum())
        cand += n - 3
        sel = s["labels"] != -100
        masked += sel.sum()
        as_mask += (s["tokens"][sel] == MASK).sum()
        kept += (s["tokens"][sel] == s["labels"][sel]).sum()
        r = sel & (s["tokens"] != MASK) & (s["tokens"] != s["labels"])
        rand += r.sum()
        assert not np.isin(s["tokens"][r], INFO.special_ids).any()
    assert abs(masked / cand - 0.15) < 0.01, masked / cand
    assert abs(as_mask / masked - 0.8) < 0.03 and abs(kept / masked - 0.1) < 0.025 and abs(rand / masked - 0.1) < 0.025


def test_whole_word_masking(long_corpus, tmp_path):
    ds = make(long_corpus, tmp_path, n=300, whole_word_masking=True)
    words_seen = 0
    for i in range(300):
        s = ds[i]
        toks, sel = unmasked(s), s["labels"] != -100
        n = int(s["padding_mask"].sum())
        k = 1
        while k < n - 1:
            if toks[k] == SEP:
                k += 1
                continue
            j = k + 1
            while j < n and toks[j] != SEP and CONT[toks[j]]:
                j += 1
            assert sel[k:j].all() or not sel[k:j].any(), (toks[k:j], sel[k:j])
            words_seen += j - k > 1 and sel[k:j].all()
            k = j
    assert words_seen > 50  # multi-piece words were masked whole


def test_samples_are_pure_functions_of_seed_and_index(corpus, tmp_path):
    a = make(corpus, tmp_path / "a")
    forward = [a[i] for i in range(40)]
    backward = [a[i] for i in reversed(range(40))][::-1]
    b = make(corpus, tmp_path / "a")  # loads the cached tables
    c = make(corpus, tmp_path / "c")  # rebuilds them
    for i in range(40):
        for k in forward[i]:
            assert np.array_equal(forward[i][k], backward[i][k]) and np.array_equal(forward[i][k], b[i][k])
            assert np.array_equal(forward[i][k], c[i][k])
    assert any(list(tmp_path.joinpath("a").glob("*.samples.npy")))
    other = BertDataset(IndexedDataset(corpus), np.arange(40), 400, 64, 8, INFO, cache_dir=tmp_path)
    assert any(not np.array_equal(other[i]["tokens"], forward[i]["tokens"]) for i in range(40))
    # resume: a sampler restarted at consumed_samples=16 yields exactly the straight run's later batches
    straight = [list(batch) for batch in PretrainingSampler(40, 0, 8)]
    resumed = [list(batch) for batch in PretrainingSampler(40, 16, 8)]
    assert resumed == straight[2:]


def test_builder_splits_and_blends(corpus, tmp_path):
    train, valid, test = build_bert_datasets([corpus], info=INFO, splits_string="80,20,0", seq_length=32, seed=1,
                                             num_samples=(50, 10, 5), cache_dir=tmp_path)
    assert len(train) == 50 and len(valid) == 10 and test is None
    blend, _, _ = build_bert_datasets([0.7, corpus, 0.3, corpus], info=INFO, splits_string="1", seq_length=32,
                                      seed=1, num_samples=(20, 0, 0), cache_dir=tmp_path)
    assert len(blend) == 20 and blend[3]["tokens"].shape == (32,)


def test_split_without_pairs_is_skipped_but_train_is_an_error(tmp_path):
    prefix = str(tmp_path / "one-sentence")
    with IndexedDatasetWriter(prefix, np.uint16, vocab_size=VOCAB) as w:
        for d in range(10):
            w.add_document(doc_tokens(d, sentences=1 if d in (0, 1, 8, 9) else 3, words=3))
    train, valid, _ = build_bert_datasets([prefix], info=INFO, splits_string="8,2,0", seq_length=32, seed=1,
                                          num_samples=(10, 4, 0), cache_dir=tmp_path)
    assert len(train) == 10 and valid is None
    with pytest.raises(DataError, match="segments"):  # the training split must have samples
        build_bert_datasets([prefix], info=INFO, splits_string="2,8,0", seq_length=32, seed=1,
                            num_samples=(10, 4, 0), cache_dir=tmp_path)


def test_with_real_wordpiece_tokenizer(tmp_path):
    from toolkit.tokenization import load_tokenizer

    tok = load_tokenizer("english-wordpiece")
    info = BertTokenInfo.from_tokenizer(tok)
    assert info.boundary_ids and info.continuation is not None and info.continuation[tok.token_to_id("##s")]
    src = tmp_path / "docs.jsonl"
    text = "The king is dead. Long live the king! Who goes there? A friend of the realm."
    src.write_text("".join(f'{{"text": "{text} Part {i}."}}\n' for i in range(6)))
    preprocess([src], tmp_path / "docs", tok, progress=False)
    ds = BertDataset(IndexedDataset(tmp_path / "docs"), np.arange(6), 10, 48, 0, info, cache_dir=tmp_path,
                     whole_word_masking=True)
    s = ds[0]
    words = tok.decode(unmasked(s)[: int(s["padding_mask"].sum())].tolist()).split()
    assert words[:2] in (["the", "king"], ["long", "live"], ["who", "goes"], ["a", "friend"], ["part", "0"])


def test_pair_task_from_config(tmp_path):
    """``data.bert_pair_task`` reaches the run's datasets: nsp (bert-tiny) and sop give the same
    groups, labels and true pairs, but a "random" pair's B is the swapped A side (sop, same
    document) or text from another document (nsp)."""
    from toolkit.config import load_config
    from toolkit.data.bert_dataset import bert_datasets_for_run
    from toolkit.errors import ConfigError
    from toolkit.tokenization import load_tokenizer

    tok = load_tokenizer("english-wordpiece")
    src = tmp_path / "docs.jsonl"
    words = ["king", "river", "stone", "garden", "winter", "music", "doctor", "island"]
    src.write_text("".join(f'{{"text": "The {w} is old. A {w} was seen. Every {w} sleeps. No {w} is here."}}\n'
                           for w in words))
    preprocess([src], tmp_path / "docs", tok, progress=False)
    common = ["model.seq_length=32", "data.splits_string=1,0,0", f"data.index_cache_dir={tmp_path}"]
    nsp_cfg = load_config("bert-tiny", common)
    sop_cfg = load_config("bert-tiny", [*common, "data.bert_pair_task=sop"])
    assert nsp_cfg.data.bert_pair_task == "nsp" and load_config("gatortron-tiny").data.bert_pair_task == "sop"
    nsp = bert_datasets_for_run(nsp_cfg, tok, [str(tmp_path / "docs")], (60, 0, 0))[0]
    sop = bert_datasets_for_run(sop_cfg, tok, [str(tmp_path / "docs")], (60, 0, 0))[0]
    assert (nsp.pair_task, sop.pair_task) == ("nsp", "sop")
    doc_word = lambda ids: {t for t in tok.decode(ids).split() if t in words}  # noqa: E731
    differ = 0
    for i in range(60):
        a, b = nsp[i], sop[i]
        assert a["is_random"] == b["is_random"]
        (na, nb), (sa, sb) = segments_of(a), segments_of(b)
        if a["is_random"] == 0:
            assert all((a[k] == b[k]).all() for k in a)  # true pairs: same sample either way
        else:
            differ += 1
            assert len(doc_word(sa) | doc_word(sb)) == 1  # sop: both halves of one document, swapped
            assert len(doc_word(na) | doc_word(nb)) == 2  # nsp: B from another document
    assert differ > 10
    with pytest.raises(ConfigError, match="did you mean 'nsp'"):
        load_config("bert-tiny", ["data.bert_pair_task=nsq"])


def test_bert_needs_bert_special_tokens():
    from toolkit.errors import ConfigError
    from toolkit.tokenization import load_tokenizer

    with pytest.raises(ConfigError, match=r"\[CLS\]"):
        BertTokenInfo.from_tokenizer(load_tokenizer("english-bpe"))


# ---------------------------------------------------------------------------- MIMIC readers

NOTE_1 = 'Admission Date:  [**2101-10-20**]\nChief Complaint: "chest pain", dyspnea\n\nPlan: ASA 81mg.'
NOTE_2 = "Brief Hospital Course:\nPt did well.\r\nDischarged home."


def quoted(text: str) -> str:
    return '"' + text.replace('"', '""') + '"'


def test_mimic3_reader(tmp_path):
    path = tmp_path / "NOTEEVENTS.csv"
    rows = ['"ROW_ID","SUBJECT_ID","HADM_ID","CHARTDATE","CHARTTIME","STORETIME","CATEGORY","DESCRIPTION","CGID","ISERROR","TEXT"',
            f'1,10,100,2101-10-20,,,"Discharge summary","Report",,,{quoted(NOTE_1)}',
            f'2,11,101,2101-10-21,,,"Nursing","Note",,1,{quoted("flagged as an error")}',
            f'3,12,,2101-10-22,,,"Radiology","CHEST",,,{quoted(NOTE_2)}']
    path.write_bytes(("\n".join(rows) + "\n").encode())
    assert list(iter_documents([path], fmt="mimic3")) == [NOTE_1, NOTE_2.replace("\r\n", "\n")]
    gz = tmp_path / "NOTEEVENTS.csv.gz"
    gz.write_bytes(gzip.compress(path.read_bytes()))
    assert list(iter_documents([gz], fmt="mimic3"))[0] == NOTE_1
    radiology = [r["text"] for r in iter_csv_notes(path, CATEGORY="Radiology")]
    assert radiology == [NOTE_2.replace("\r\n", "\n")]


def test_mimic4_reader_and_cli_preprocess(tmp_path):
    path = tmp_path / "discharge.csv"
    rows = ["note_id,subject_id,hadm_id,note_type,note_seq,charttime,storetime,text",
            f"10-DS-1,10,100,DS,1,2180-05-07 00:00:00,,{quoted(NOTE_1)}",
            f"10-DS-2,10,101,DS,2,2180-06-07 00:00:00,,{quoted(NOTE_2)}"]
    path.write_text("\n".join(rows) + "\n")
    assert list(iter_documents([path], fmt="mimic4")) == [NOTE_1, NOTE_2.replace("\r\n", "\n")]
    out = run_cli("preprocess", "--input", str(path), "--output-prefix", str(tmp_path / "notes"), "--format", "mimic4",
                  "--tokenizer", "clinical-wordpiece", timeout=120)
    assert out.returncode == 0, out.stderr
    assert len(IndexedDataset(tmp_path / "notes")) == 2


def test_mimic_reader_errors(tmp_path):
    detail = tmp_path / "discharge_detail.csv"
    detail.write_text("note_id,subject_id,field_name,field_value\n1,2,author,x\n")
    with pytest.raises(DataError, match="no column 'text'"):
        list(iter_documents([detail], fmt="mimic4"))
    truncated = tmp_path / "radiology.csv"
    truncated.write_text('note_id,text\n1,"an unterminated\nnote')
    with pytest.raises(DataError, match="malformed CSV"):
        list(iter_documents([truncated], fmt="mimic4"))
