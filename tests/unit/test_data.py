import json
import logging
from pathlib import Path

import datasets
import pytest
import torch

from lisa_dist.config import DataConfig
from lisa_dist.data import (
    ALPACA_PROMPT,
    ALPACA_PROMPT_NO_INPUT,
    ShardedBatches,
    cache_key,
    collate,
    load_examples,
    load_examples_with_stats,
    resolve_sources,
)
from lisa_dist.data import sources as data_sources
from lisa_dist.errors import DataError
from lisa_dist.models import IGNORE_INDEX, byte_tokenizer

ALPACA_FILE = Path("/work/shared/data/alpaca_gpt4_en_999.json")


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer()


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def write_json_list(path: Path, rows: list) -> Path:
    path.write_text(json.dumps(rows, indent=1))
    return path


def config(tmp_path: Path, path: Path | str, fmt: str, **kw) -> DataConfig:
    return DataConfig(path=str(path), format=fmt, cache_dir=str(tmp_path / "cache"), **kw)


def ids_of(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def supervised_runs(ids: list[int], labels: list[int]) -> list[list[int]]:
    """Maximal runs of positions with a loss, as token ids."""
    runs, current = [], []
    for token, label in zip(ids, labels, strict=True):
        if label == IGNORE_INDEX:
            if current:
                runs.append(current)
            current = []
        else:
            assert label == token
            current.append(token)
    return runs + ([current] if current else [])


# ---------------------------------------------------------------------------------------------------------------
# Text: packing


TEXTS = ["The quick brown fox.", "jumps over", "the lazy dog, again and again.", "Fin."]


def test_text_jsonl_is_packed_into_full_blocks(tmp_path, tok):
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": t} for t in TEXTS])
    ds = load_examples(config(tmp_path, path, "text", max_length=16), tok)
    stream = [i for t in TEXTS for i in [*ids_of(tok, t), tok.eos_token_id]]
    assert len(ds) == len(stream) // 16
    assert all(len(ex["input_ids"]) == 16 and ex["labels"] == ex["input_ids"] for ex in ds)
    assert [i for ex in ds for i in ex["input_ids"]] == stream[: len(ds) * 16]


def test_text_txt_paragraphs_and_parquet_field(tmp_path, tok):
    (tmp_path / "s.txt").write_text("para one\nline two\n\npara three\n\n" + "x" * 40 + "\n")
    ds = load_examples(config(tmp_path, tmp_path / "s.txt", "text", max_length=8), tok)
    paragraphs = ["para one\nline two", "para three", "x" * 40 + "\n"]
    stream = [i for p in paragraphs for i in [*ids_of(tok, p), tok.eos_token_id]]
    assert [i for ex in ds for i in ex["input_ids"]] == stream[: len(stream) // 8 * 8]

    datasets.Dataset.from_dict({"content": TEXTS}).to_parquet(str(tmp_path / "t.parquet"))
    ds = load_examples(config(tmp_path, tmp_path / "t.parquet", "text", max_length=8, text_field="content"), tok)
    stream = [i for t in TEXTS for i in [*ids_of(tok, t), tok.eos_token_id]]
    assert [i for ex in ds for i in ex["input_ids"]] == stream[: len(stream) // 8 * 8]


def test_folder_reads_its_files_in_sorted_order(tmp_path, tok):
    folder = tmp_path / "corpus"
    folder.mkdir()
    write_jsonl(folder / "b.jsonl", [{"text": t} for t in TEXTS[2:]])
    write_jsonl(folder / "a.jsonl", [{"text": t} for t in TEXTS[:2]])
    ds = load_examples(config(tmp_path, folder, "text", max_length=4), tok)
    stream = [i for t in TEXTS for i in [*ids_of(tok, t), tok.eos_token_id]]
    assert [i for ex in ds for i in ex["input_ids"]] == stream[: len(stream) // 4 * 4]
    (folder / "c.txt").write_text("more")
    with pytest.raises(DataError, match="mixes file kinds"):
        resolve_sources(config(tmp_path, folder, "text"))


# ---------------------------------------------------------------------------------------------------------------
# Alpaca and chat: the loss mask


ALPACA_ROWS = [
    {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
    {"instruction": "Say hello.", "input": "", "output": "Hello there!"},
    {"instruction": "Name a colour.", "output": "Blue."},
]


def test_alpaca_labels_mask_exactly_the_prompt(tmp_path, tok):
    path = write_json_list(tmp_path / "a.json", ALPACA_ROWS)
    ds = load_examples(config(tmp_path, path, "alpaca", max_length=512), tok)
    assert len(ds) == 3
    for row, ex in zip(ALPACA_ROWS, ds, strict=True):
        template = ALPACA_PROMPT if row.get("input") else ALPACA_PROMPT_NO_INPUT
        prompt = [
            tok.bos_token_id,
            *ids_of(tok, template.format(instruction=row["instruction"], input=row.get("input", ""))),
        ]
        ids, labels = ex["input_ids"], ex["labels"]
        assert ids[: len(prompt)] == prompt
        assert labels[: len(prompt)] == [IGNORE_INDEX] * len(prompt)
        assert IGNORE_INDEX not in labels[len(prompt) :]
        supervised = [t for t in labels if t != IGNORE_INDEX]
        assert tok.decode(supervised, skip_special_tokens=False) == row["output"] + tok.eos_token


def test_alpaca_truncation_keeps_a_partial_response_and_rejects_a_prompt_only_row(tmp_path, tok):
    row = {"instruction": "Say hello.", "output": "Hello there, this is a long answer."}
    path = write_jsonl(tmp_path / "a.jsonl", [row])
    prompt_len = 1 + len(ids_of(tok, ALPACA_PROMPT_NO_INPUT.format(instruction=row["instruction"])))
    ex = load_examples(config(tmp_path, path, "alpaca", max_length=prompt_len + 3), tok)[0]
    assert len(ex["input_ids"]) == prompt_len + 3
    assert tok.decode([t for t in ex["labels"] if t != IGNORE_INDEX]) == "Hel"
    with pytest.raises(DataError, match=r"a\.jsonl, line 1: no supervised token left after truncation"):
        load_examples(config(tmp_path, path, "alpaca", max_length=prompt_len), tok)


CONVERSATION = [
    {"role": "system", "content": "SYSTEM RULES"},
    {"role": "user", "content": "USER ONE"},
    {"role": "assistant", "content": "first answer"},
    {"role": "user", "content": "USER TWO"},
    {"role": "assistant", "content": "second answer"},
]


def test_chat_supervises_only_assistant_turns(tmp_path, tok):
    rows = [{"messages": CONVERSATION}, {"messages": CONVERSATION[1:3]}]
    path = write_jsonl(tmp_path / "c.jsonl", rows)
    ds = load_examples(config(tmp_path, path, "chat", max_length=512), tok)
    assert len(ds) == 2
    whole = tok.apply_chat_template(CONVERSATION, tokenize=False)
    assert tok.decode(ds[0]["input_ids"], skip_special_tokens=False) == whole
    runs = [tok.decode(r, skip_special_tokens=False) for r in supervised_runs(ds[0]["input_ids"], ds[0]["labels"])]
    assert runs == ["first answer<|im_end|>\n", "second answer<|im_end|>\n"]
    runs = [tok.decode(r, skip_special_tokens=False) for r in supervised_runs(ds[1]["input_ids"], ds[1]["labels"])]
    assert runs == ["first answer<|im_end|>\n"]


def test_chat_template_problems(tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl", [{"messages": CONVERSATION}])
    plain = byte_tokenizer()
    plain.chat_template = None
    with pytest.raises(DataError, match="lisa_dist/byte-tokenizer has no chat template"):
        load_examples(config(tmp_path, path, "chat"), plain)
    unstable = byte_tokenizer()
    # The generation prompt differs from how an assistant turn starts (no prefix of the rendering marks the turn,
    # which the old masking refused): the turn is found by its content, from there through its end of turn.
    unstable.chat_template = unstable.chat_template.replace("assistant\n{% endif %}", "assistant:\n{% endif %}")
    assert unstable.chat_template != byte_tokenizer().chat_template
    ds = load_examples(config(tmp_path / "unstable", path, "chat"), unstable)
    runs = [unstable.decode(r, skip_special_tokens=False) for r in supervised_runs(ds[0]["input_ids"], ds[0]["labels"])]
    assert runs == [m["content"] + "<|im_end|>\n" for m in CONVERSATION if m["role"] == "assistant"]


# ---------------------------------------------------------------------------------------------------------------
# Bad rows


@pytest.mark.parametrize("writer, unit", [(write_jsonl, "line"), (write_json_list, "record")])
@pytest.mark.parametrize(
    "bad, reason",
    [
        ({"instruction": "Hi", "input": ""}, "missing field 'output'"),
        ({"instruction": 7, "output": "x"}, "field 'instruction' is int, not str"),
        ({"instruction": "Hi", "output": "  "}, "field 'output' is empty"),
        ({"instruction": "Hi", "input": ["a"], "output": "x"}, "field 'input' is list, not str"),
    ],
)
def test_bad_alpaca_rows_name_file_and_row(tmp_path, tok, writer, unit, bad, reason):
    path = writer(tmp_path / f"bad.{'jsonl' if unit == 'line' else 'json'}", [*ALPACA_ROWS[:2], bad, ALPACA_ROWS[2]])
    with pytest.raises(DataError, match=f"{path.name}, {unit} 3: {reason}"):
        load_examples(config(tmp_path, path, "alpaca"), tok)


def test_jsonl_line_numbers_count_blank_lines(tmp_path, tok):
    path = tmp_path / "gaps.jsonl"
    path.write_text(json.dumps(ALPACA_ROWS[0]) + "\n\n\n" + json.dumps({"instruction": "x"}) + "\n")
    with pytest.raises(DataError, match=r"gaps.jsonl, line 4: missing field 'output'"):
        load_examples(config(tmp_path, path, "alpaca"), tok)


@pytest.mark.parametrize(
    "messages, reason",
    [
        ([{"role": "user", "content": "hi"}], "no assistant message"),
        ([{"role": "robot", "content": "hi"}, {"role": "assistant", "content": "x"}], "message 1 has role 'robot'"),
        ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": 3}], "message 2 content is int"),
        ("hello", "field 'messages' is str"),
    ],
)
def test_bad_chat_rows(tmp_path, tok, messages, reason):
    path = write_jsonl(tmp_path / "c.jsonl", [{"messages": CONVERSATION}, {"messages": messages}])
    with pytest.raises(DataError, match=f"c.jsonl, line 2: {reason}"):
        load_examples(config(tmp_path, path, "chat"), tok)


def test_skip_bad_rows_counts_and_logs_them(tmp_path, tok, caplog):
    rows = [
        ALPACA_ROWS[0],
        {"instruction": "x"},
        {"instruction": 1, "output": "y"},
        ALPACA_ROWS[1],
        {"instruction": "z", "output": ""},
    ]
    path = write_jsonl(tmp_path / "a.jsonl", rows)
    with caplog.at_level(logging.WARNING, logger="lisa_dist.data.sources"):
        ds, stats = load_examples_with_stats(config(tmp_path, path, "alpaca", skip_bad_rows=True), tok)
    assert len(ds) == 2 and stats.examples == 2 and stats.rows == 5 and stats.skipped_rows == 3
    assert "skipped 3 bad rows" in caplog.text and "line 2: missing field 'output'" in caplog.text
    # A cache hit reports the same numbers.
    _, again = load_examples_with_stats(config(tmp_path, path, "alpaca", skip_bad_rows=True), tok)
    assert again.cache_hit and again.skipped_rows == 3


def test_empty_dataset_is_an_error(tmp_path, tok):
    path = write_jsonl(tmp_path / "a.jsonl", [{"instruction": "x"}, {"output": "y"}])
    with pytest.raises(DataError, match="no training examples: 2 rows read, 2 skipped"):
        load_examples(config(tmp_path, path, "alpaca", skip_bad_rows=True), tok)
    short = write_jsonl(tmp_path / "t.jsonl", [{"text": "tiny"}])
    with pytest.raises(DataError, match=r"no training examples.*at least 64 tokens"):
        load_examples(config(tmp_path, short, "text", max_length=64), tok)
    assert not any((tmp_path / "cache").iterdir())


def test_paths_that_do_not_resolve(tmp_path, tok, monkeypatch):
    with pytest.raises(DataError, match="does not exist"):
        load_examples(config(tmp_path, tmp_path / "missing.jsonl", "alpaca"), tok)
    with pytest.raises(DataError, match="does not exist"):
        load_examples(config(tmp_path, "./nowhere", "alpaca"), tok)

    def unreachable(*args, **kwargs):
        raise ConnectionError("offline")

    monkeypatch.setattr(datasets, "load_dataset", unreachable)
    with pytest.raises(DataError, match="'someone/corpus' is neither a local file or folder nor a dataset reachable"):
        load_examples(config(tmp_path, "someone/corpus", "alpaca"), tok)


# ---------------------------------------------------------------------------------------------------------------
# Cache


def test_cache_hit_does_not_retokenize_and_a_changed_file_does(tmp_path, tok, monkeypatch):
    path = write_jsonl(tmp_path / "a.jsonl", ALPACA_ROWS)
    cfg = config(tmp_path, path, "alpaca")
    first, stats = load_examples_with_stats(cfg, tok)
    assert not stats.cache_hit and len(first) == 3

    def forbidden(*args):
        raise AssertionError("tokenized again")

    with monkeypatch.context() as m:
        m.setattr(data_sources, "_tokenize", forbidden)
        second, stats = load_examples_with_stats(cfg, tok)
    assert stats.cache_hit and second.to_list() == first.to_list()

    write_jsonl(path, ALPACA_ROWS + ALPACA_ROWS[:1])
    third, stats = load_examples_with_stats(cfg, tok)
    assert not stats.cache_hit and len(third) == 4
    entries = sorted(p.name for p in (tmp_path / "cache").iterdir())
    assert len(entries) == 2 and not any(name.startswith(".tmp") for name in entries)


def test_cache_key_follows_tokenizer_and_options(tmp_path, tok):
    path = write_jsonl(tmp_path / "a.jsonl", ALPACA_ROWS)
    cfg = config(tmp_path, path, "alpaca")
    sources = resolve_sources(cfg)
    key = cache_key(cfg, sources, tok)
    assert cache_key(cfg, sources, byte_tokenizer()) == key
    other = byte_tokenizer()
    other.chat_template = "{{ messages }}"
    assert cache_key(cfg, sources, other) != key
    assert cache_key(config(tmp_path, path, "alpaca", max_length=64), sources, tok) != key
    assert cache_key(config(tmp_path, path, "chat"), sources, tok) != key


def test_only_the_main_rank_tokenizes_and_every_rank_waits_once(tmp_path, tok, monkeypatch):
    path = write_jsonl(tmp_path / "a.jsonl", ALPACA_ROWS)
    cfg = config(tmp_path, path, "alpaca")
    calls = []
    with pytest.raises(DataError, match="main rank failed"):
        load_examples(cfg, tok, is_main=False, barrier=lambda: calls.append("early"))
    main = load_examples(cfg, tok, is_main=True, barrier=lambda: calls.append("main"))
    monkeypatch.setattr(data_sources, "_tokenize", lambda *a: pytest.fail("a non-main rank tokenized"))
    other = load_examples(cfg, tok, is_main=False, barrier=lambda: calls.append("other"))
    assert other.to_list() == main.to_list() and calls == ["early", "main", "other"]

    bad = write_jsonl(tmp_path / "bad.jsonl", [{"instruction": "x"}])
    with pytest.raises(DataError, match="missing field"):
        load_examples(config(tmp_path, bad, "alpaca"), tok, barrier=lambda: calls.append("failing main"))
    assert calls[-1] == "failing main"


# ---------------------------------------------------------------------------------------------------------------
# Order and sharding


def toy_dataset(n: int) -> datasets.Dataset:
    """Example i is [i + 1] * (1 + i % 3): its first token names it and lengths vary for padding."""
    ids = [[i + 1] * (1 + i % 3) for i in range(n)]
    return datasets.Dataset.from_dict({"input_ids": ids, "labels": ids})


def batches(ds, world, micro, accum, seed=3) -> list[ShardedBatches]:
    return [
        ShardedBatches(ds, seed=seed, rank=r, world_size=world, micro_batch_size=micro, grad_accum=accum)
        for r in range(world)
    ]


@pytest.mark.parametrize("world", [1, 2, 3])
@pytest.mark.parametrize("n", [12, 13, 29])
def test_rank_shards_are_disjoint_and_cover_the_epoch(world, n):
    ranks = batches(toy_dataset(n), world, micro=2, accum=2)
    spe = ranks[0].steps_per_epoch
    assert spe == n // (world * 4) and all(r.steps_per_epoch == spe for r in ranks)
    perm = ranks[0].permutation(0).tolist()
    assert sorted(perm) == list(range(n))
    streams = [[i for s in range(spe) for micro in r.step_indices(s) for i in micro] for r in ranks]
    for rank, r in enumerate(ranks):
        for s in range(spe):
            for k, micro in enumerate(r.step_indices(s)):
                first = s * world * 4 + (k * world + rank) * 2
                assert micro == perm[first : first + 2]
    seen = [i for stream in streams for i in stream]
    assert len(seen) == len(set(seen)) == spe * world * 4
    assert set(seen) == set(perm[: spe * world * 4])


def test_two_ranks_see_the_global_batch_of_one_rank_with_double_micro_batch():
    ds = toy_dataset(37)
    two = batches(ds, world=2, micro=2, accum=3)
    one = batches(ds, world=1, micro=4, accum=3)[0]
    assert one.steps_per_epoch == two[0].steps_per_epoch == 3
    for step in range(8):  # crosses two epoch boundaries
        reference = one.step_indices(step)
        union = [sorted(a + b) for a, b in zip(two[0].step_indices(step), two[1].step_indices(step), strict=True)]
        assert union == [sorted(m) for m in reference]
        epoch, within = divmod(step, 3)
        assert [i for m in reference for i in m] == one.permutation(epoch)[within * 12 : (within + 1) * 12].tolist()


def test_one_rank_with_more_accumulation_computes_the_ranks_micro_batches():
    """The bitwise reference of a W-rank run: micro batch M, W*A accumulation steps, micro k*W+r == rank r's k."""
    ds = toy_dataset(41)
    two = batches(ds, world=2, micro=3, accum=2)
    one = batches(ds, world=1, micro=3, accum=4)[0]
    for step in range(7):
        reference = one.step_indices(step)
        for rank in range(2):
            for k, micro in enumerate(two[rank].step_indices(step)):
                assert micro == reference[k * 2 + rank]


def test_epochs_reshuffle_deterministically_and_steps_are_pure():
    ds = toy_dataset(20)
    a, b = batches(ds, 1, micro=5, accum=1)[0], batches(ds, 1, micro=5, accum=1)[0]
    assert a.epoch_of(3) == 0 and a.epoch_of(4) == 1
    e0, e1 = a.permutation(0).tolist(), a.permutation(1).tolist()
    assert e0 != e1 and sorted(e0) == sorted(e1)
    assert e0 == torch.randperm(20, generator=torch.Generator().manual_seed(3)).tolist()
    torch.manual_seed(123)  # global RNG must not matter
    forward = [a.step_indices(s) for s in range(10)]
    backward = [b.step_indices(s) for s in reversed(range(10))][::-1]
    assert forward == backward
    assert batches(ds, 1, 5, 1, seed=4)[0].step_indices(0) != forward[0]


def test_step_batches_collate_with_padding():
    ds = toy_dataset(8)
    sharded = ShardedBatches(ds, seed=0, rank=1, world_size=2, micro_batch_size=2, grad_accum=2, pad_id=99)
    micro = sharded.step_batches(1)
    assert len(micro) == 2
    for indices, batch in zip(sharded.step_indices(1), micro, strict=True):
        assert set(batch) == {"input_ids", "labels", "attention_mask"}
        assert all(t.dtype == torch.long for t in batch.values())
        lengths = [1 + i % 3 for i in indices]
        assert batch["input_ids"].shape == (2, max(lengths))
        for row, (i, length) in enumerate(zip(indices, lengths, strict=True)):
            assert batch["input_ids"][row].tolist() == [i + 1] * length + [99] * (max(lengths) - length)
            assert batch["labels"][row].tolist() == [i + 1] * length + [IGNORE_INDEX] * (max(lengths) - length)
            assert batch["attention_mask"][row].tolist() == [1] * length + [0] * (max(lengths) - length)


def test_collate_pads_right():
    batch = collate([[5, 6, 7], [8]], [[IGNORE_INDEX, 6, 7], [8]], pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["labels"].tolist() == [[IGNORE_INDEX, 6, 7], [8, IGNORE_INDEX, IGNORE_INDEX]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]


def test_too_small_dataset_is_an_error():
    with pytest.raises(DataError, match=r"has 7 examples but one global batch needs .* = 2\*2\*2 = 8"):
        ShardedBatches(toy_dataset(7), seed=0, rank=0, world_size=2, micro_batch_size=2, grad_accum=2)


# ---------------------------------------------------------------------------------------------------------------
# Real data


@pytest.mark.skipif(not ALPACA_FILE.is_file(), reason="shared alpaca sample not present")
def test_real_alpaca_file(tmp_path, tok):
    # The byte tokenizer spends one token per byte: at 256 many prompts leave no room for a response.
    cfg = config(tmp_path, ALPACA_FILE, "alpaca", max_length=256, skip_bad_rows=True)
    ds, stats = load_examples_with_stats(cfg, tok)
    assert stats.rows == 999 and stats.examples == len(ds) == 999 - stats.skipped_rows
    assert len(ds) > 500
    for ex in ds.select(range(0, len(ds), 25)):
        assert 0 < len(ex["input_ids"]) <= 256 and len(ex["labels"]) == len(ex["input_ids"])
        assert ex["input_ids"][0] == tok.bos_token_id and ex["labels"][0] == IGNORE_INDEX
        assert any(label != IGNORE_INDEX for label in ex["labels"])
    sharded = ShardedBatches(ds, seed=0, rank=0, world_size=2, micro_batch_size=4, grad_accum=2)
    batch = sharded.step_batches(sharded.steps_per_epoch)[0]
    assert batch["input_ids"].shape[0] == 4 and batch["input_ids"].shape[1] <= 256
