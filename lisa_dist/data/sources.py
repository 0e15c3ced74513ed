"""Training data: read files or a hub dataset, tokenize with a loss mask, cache, and cut into per-rank batches.

Formats: `text` packs raw text into blocks of max_length tokens; `alpaca` supervises only the response of an
instruction/input/output record; `chat` (OpenAI messages) and `sharegpt` (from/value turns) supervise only the
assistant turns of a conversation rendered with the tokenizer's chat template (`lisa_dist.data.chat`); `auto` takes
the first row's format. Tokenized examples are cached once per (source, format, length, tokenizer), and the
order of examples is a pure function of (seed, epoch), so every rank and a resumed run agree without communicating.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import itertools
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import datasets

from lisa_dist.config import DataConfig, DataFormat
from lisa_dist.data.chat import encode_messages, parse_messages, sharegpt_messages
from lisa_dist.data.rows import BadRow as _BadRow
from lisa_dist.errors import DataError
from lisa_dist.models import IGNORE_INDEX

log = logging.getLogger(__name__)

CACHE_VERSION = 4
"""Bump when tokenization changes, so that old caches are not reused."""
FILE_KINDS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".txt": "text"}
FEATURES = datasets.Features(
    {
        "input_ids": datasets.Sequence(datasets.Value("int32")),
        "labels": datasets.Sequence(datasets.Value("int32")),
    }
)

# The Stanford Alpaca prompts, with and without the optional input.
ALPACA_PROMPT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)


@dataclass
class DataStats:
    """What tokenization did; stored next to the cache so a cache hit reports the same numbers."""

    rows: int = 0
    examples: int = 0
    skipped_rows: int = 0
    truncated_rows: int = 0
    """Examples cut to data.max_length (their tail is not trained on)."""
    tokens: int = 0
    supervised_tokens: int = 0
    cache_hit: bool = False
    cache_path: str = ""


@dataclass(frozen=True)
class Source:
    """One thing to read: a local file (kind json, parquet or text) or a hub dataset (kind hub)."""

    name: str
    kind: str


# ---------------------------------------------------------------------------------------------------------------
# Sources


def resolve_sources(cfg: DataConfig) -> list[Source]:
    """The files behind data.path (one file, or every data file of a folder, sorted), or the hub id."""
    path = Path(cfg.path).expanduser()
    if path.is_file():
        return [_file_source(path)]
    if path.is_dir() and (cfg.subset or (path / "README.md").is_file()):
        return [Source(str(path.resolve()), "hub")]  # a dataset repository (its card names its configs and splits)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix in FILE_KINDS)
        if not files:
            raise DataError(f"data.path folder {path} holds no {'/'.join(FILE_KINDS)} files")
        kinds = {FILE_KINDS[p.suffix] for p in files}
        if len(kinds) > 1:
            raise DataError(
                f"data.path folder {path} mixes file kinds ({', '.join(sorted(kinds))}): use one kind per folder"
            )
        return [_file_source(p) for p in files]
    if _looks_local(cfg.path):
        raise DataError(f"data.path {cfg.path!r} does not exist")
    return [Source(cfg.path, "hub")]


def _file_source(path: Path) -> Source:
    if path.suffix not in FILE_KINDS:
        raise DataError(
            f"data.path {path}: unsupported file type {path.suffix!r} (expected one of {', '.join(FILE_KINDS)})"
        )
    return Source(str(path.resolve()), FILE_KINDS[path.suffix])


def _looks_local(path: str) -> bool:
    # Hub ids are `name` or `owner/name`; anything else that names no file was meant as a local path.
    return (
        Path(path).is_absolute()
        or path.startswith((".", "~"))
        or Path(path).suffix in FILE_KINDS
        or path.count("/") > 1
    )


def _read_source(
    source: Source,
    split: str,
    scratch: Path,
    subset: str = "",
    revision: str = "",
) -> Iterator[tuple[str, Any]]:
    """(where, row) for every row of `source`, `where` as the user finds it in the file (1-based line or record);
    a row that cannot even be read (not UTF-8, malformed JSON) comes as a `_BadRow` in its place."""
    if source.kind == "json":
        yield from _json_rows(Path(source.name))
        return
    if source.kind == "text":
        yield from _text_rows(Path(source.name))
        return
    if source.kind == "hub":
        try:
            rows = datasets.load_dataset(source.name, name=subset or None, revision=revision or None, split=split)
        except Exception as exc:
            where = (
                f"split {split!r}"
                + (f", subset {subset!r}" if subset else "")
                + (f", revision {revision!r}" if revision else "")
            )
            raise DataError(
                f"data.path {source.name!r} is neither a local file or folder nor a dataset reachable "
                f"on the hub ({where}): {_root_cause(exc)}"
            ) from exc
    else:
        try:
            # The builder's own cache goes to scratch: our tokenized cache is the only one kept.
            rows = datasets.load_dataset(source.kind, data_files=source.name, split="train", cache_dir=str(scratch))
        except Exception as exc:
            raise DataError(f"{source.name} could not be read as {source.kind}: {_root_cause(exc)}") from exc
    for index, row in enumerate(rows):
        yield f"row {index + 1}", row


def _root_cause(exc: BaseException) -> BaseException:
    while (inner := exc.__cause__ or exc.__context__) is not None:
        exc = inner
    return exc


def _line_of(data: bytes, offset: int) -> int:
    return data.count(b"\n", 0, offset) + 1


def _json_rows(path: Path) -> Iterator[tuple[str, Any]]:
    """A JSON list of objects, or JSON lines (one object per line; blank lines allowed)."""
    with open(path, "rb") as f:
        head = f.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")
    if not head:
        raise DataError(f"{path} is empty (or holds only whitespace): expected JSON lines or a JSON list")
    if head.startswith(b"["):
        yield from _json_list(path)
        return
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            if number == 1:
                raw = raw.removeprefix(b"\xef\xbb\xbf")
            if not raw.strip():
                continue
            yield f"line {number}", _json_object(raw)


def _json_object(raw: bytes) -> Any:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return _BadRow(f"not UTF-8 text (byte 0x{raw[exc.start]:02x} at column {exc.start + 1})")
    try:
        row = json.loads(text)
    except json.JSONDecodeError as exc:
        return _BadRow(f"malformed JSON ({exc.msg} at column {exc.colno})")
    if not isinstance(row, dict):
        return _BadRow(f"a JSON {type(row).__name__}, not an object with the fields of a row")
    return row


def _json_list(path: Path) -> Iterator[tuple[str, Any]]:
    data = path.read_bytes().removeprefix(b"\xef\xbb\xbf")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(
            f"{path}, line {_line_of(data, exc.start)}: not UTF-8 text (byte 0x{data[exc.start]:02x}); "
            "a JSON list cannot skip a bad record: fix or remove it"
        ) from None
    decoder = json.JSONDecoder()
    start = len(text) - len(text.lstrip())
    try:
        rows, end = decoder.raw_decode(text, start)
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}, line {exc.lineno}: malformed JSON ({exc.msg} at column {exc.colno})") from None
    rest = text[end:]
    if rest.strip():
        line = text.count("\n", 0, end + len(rest) - len(rest.lstrip())) + 1
        raise DataError(
            f"{path}, line {line}: more JSON after the list: a file holds one JSON list or JSON lines, not both"
        )
    for number, row in enumerate(rows, start=1):
        yield (
            f"record {number}",
            row
            if isinstance(row, dict)
            else _BadRow(f"a JSON {type(row).__name__}, not an object with the fields of a row"),
        )


def _text_rows(path: Path) -> Iterator[tuple[str, Any]]:
    """Paragraphs (separated by blank lines) of a UTF-8 text file; `where` is a paragraph's first line."""
    if not path.read_bytes().strip():
        raise DataError(f"{path} is empty (or holds only whitespace)")
    lines: list[str] = []
    first = 0
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8").replace("\r\n", "\n").replace("\r", "\n")
            except UnicodeDecodeError as exc:
                yield (
                    f"line {number}",
                    _BadRow(f"not UTF-8 text (byte 0x{raw[exc.start]:02x} at column {exc.start + 1})"),
                )
                continue
            if line.strip():
                first = first or number
                lines.append(line)
            elif lines:
                yield f"line {first}", {"text": "".join(lines).rstrip("\n")}
                lines, first = [], 0
    if lines:
        yield f"line {first}", {"text": "".join(lines).rstrip("\n")}


# ---------------------------------------------------------------------------------------------------------------
# Rows to token ids


def _tokenize(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _str_field(row: Mapping[str, Any], name: str, required: bool = True, blank_ok: bool = False) -> str:
    value = row.get(name)
    if value is None:
        if required:
            raise _BadRow(f"missing field '{name}'")
        return ""
    if not isinstance(value, str):
        raise _BadRow(f"field '{name}' is {type(value).__name__}, not str")
    if not blank_ok and not value.strip():
        raise _BadRow(f"field '{name}' is empty")
    return value


def _truncated(ids: list[int], labels: list[int], max_length: int) -> tuple[list[int], list[int]]:
    """An encoded example cut to max_length tokens (`_encoded_rows` counts the cut ones)."""
    if not ids:
        raise _BadRow("empty after tokenization")
    ids, labels = ids[:max_length], labels[:max_length]
    if all(label == IGNORE_INDEX for label in labels):
        raise _BadRow(f"no supervised token left after truncation to data.max_length={max_length}")
    return ids, labels


def encode_text(row: Mapping[str, Any], field: str, tokenizer: Any) -> list[int]:
    """The row's text as token ids plus eos, to be packed with its neighbours."""
    ids = _tokenize(tokenizer, _str_field(row, field, blank_ok=True))
    if not ids:
        raise _BadRow(f"field '{field}' is empty after tokenization")
    return [*ids, tokenizer.eos_token_id]


def alpaca_prompt(tokenizer: Any, instruction: str, context: str = "") -> list[int]:
    """bos + the Alpaca prompt of `instruction` (and its optional input `context`): what the response follows."""
    template = ALPACA_PROMPT if context.strip() else ALPACA_PROMPT_NO_INPUT
    bos = [] if tokenizer.bos_token_id is None else [tokenizer.bos_token_id]
    return bos + _tokenize(tokenizer, template.format(instruction=instruction, input=context))


def encode_alpaca(row: Mapping[str, Any], tokenizer: Any, max_length: int) -> tuple[list[int], list[int]]:
    """bos + Alpaca prompt (unsupervised) + output + eos (supervised), truncated to max_length (untruncated: 0)."""
    instruction = _str_field(row, "instruction")
    context = _str_field(row, "input", required=False, blank_ok=True)
    output = _str_field(row, "output")
    prompt = alpaca_prompt(tokenizer, instruction, context)
    # Tokenized apart so that the mask falls exactly on the response, whatever the tokenizer merges.
    response = [*_tokenize(tokenizer, output), tokenizer.eos_token_id]
    ids, labels = prompt + response, [IGNORE_INDEX] * len(prompt) + response
    return _truncated(ids, labels, max_length) if max_length else (ids, labels)


def encode_chat(row: Mapping[str, Any], field: str, tokenizer: Any, max_length: int) -> tuple[list[int], list[int]]:
    """The conversation through the chat template, supervised only on assistant turns (`lisa_dist.data.chat`),
    truncated to max_length (untruncated: 0)."""
    ids, labels = encode_messages(parse_messages(row, field), tokenizer)
    return _truncated(ids, labels, max_length) if max_length else (ids, labels)


def encode_sharegpt(row: Mapping[str, Any], field: str, tokenizer: Any) -> tuple[list[int], list[int]]:
    """A ShareGPT conversation as `encode_chat` encodes messages (its function-call turns supervised, its tool
    observations not)."""
    return encode_messages(sharegpt_messages(row, field), tokenizer)


def _tokenizer_name(tokenizer: Any) -> str:
    return getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__


def _check_tokenizer(cfg: DataConfig, tokenizer: Any) -> None:
    if tokenizer.eos_token_id is None and cfg.format in ("text", "alpaca"):
        raise DataError(
            f"tokenizer {_tokenizer_name(tokenizer)} has no eos token, which the {cfg.format} "
            "format ends every example with"
        )
    if cfg.format in ("chat", "sharegpt") and not getattr(tokenizer, "chat_template", None):
        raise DataError(
            f"tokenizer {_tokenizer_name(tokenizer)} has no chat template, which data.format="
            f"{cfg.format} needs: set data.chat_template (a Jinja file, or chatml) or use the alpaca "
            "format"
        )


# ---------------------------------------------------------------------------------------------------------------
# Examples


def _encoder(cfg: DataConfig, tokenizer: Any, source: Source) -> Callable[[Mapping[str, Any]], Any]:
    if cfg.format == "text":
        # A .txt file has a single column, `text`, whatever data.text_field says.
        field = "text" if source.kind == "text" else cfg.text_field
        return functools.partial(encode_text, field=field, tokenizer=tokenizer)
    if cfg.format == "alpaca":
        return functools.partial(encode_alpaca, tokenizer=tokenizer, max_length=0)
    if cfg.format == "sharegpt":
        return functools.partial(encode_sharegpt, field=cfg.conversations_field, tokenizer=tokenizer)
    return functools.partial(encode_chat, field=cfg.messages_field, tokenizer=tokenizer, max_length=0)


def detect_format(cfg: DataConfig, sources: list[Source]) -> DataConfig:
    """data.format=auto: the format the first readable row's fields say (a .txt file is text); else `cfg`."""
    if cfg.format != "auto":
        return cfg
    source = sources[0]
    if source.kind == "text":
        return replace(cfg, format="text")
    with tempfile.TemporaryDirectory() as scratch:
        for label, row in _read_source(source, cfg.split, Path(scratch), cfg.subset, cfg.revision):
            if isinstance(row, Mapping):
                return replace(cfg, format=_format_of(row, cfg, f"{source.name}, {label}"))
    raise DataError(f"data.format=auto: {source.name} has no row to tell its format from")


def _format_of(row: Mapping[str, Any], cfg: DataConfig, where: str) -> DataFormat:
    candidates: tuple[tuple[DataFormat, list[str]], ...] = (
        ("chat", [cfg.messages_field]),
        ("sharegpt", [cfg.conversations_field]),
        ("alpaca", ["instruction", "output"]),
        ("text", [cfg.text_field]),
    )
    for fmt, fields in candidates:
        if all(f in row for f in fields):
            return fmt
    raise DataError(
        f"data.format=auto: {where} has fields {', '.join(map(repr, row)) or 'none'}; expected "
        f"'{cfg.messages_field}' (chat), '{cfg.conversations_field}' (sharegpt), 'instruction' and "
        f"'output' (alpaca) or '{cfg.text_field}' (text)"
    )


def _encoded_rows(
    cfg: DataConfig, tokenizer: Any, sources: list[Source], scratch: Path, stats: DataStats
) -> Iterator[Any]:
    for source in sources:
        encode = _encoder(cfg, tokenizer, source)
        skipped = 0
        for label, row in _read_source(source, cfg.split, scratch, cfg.subset, cfg.revision):
            stats.rows += 1
            try:
                if isinstance(row, _BadRow):
                    raise row
                encoded = encode(row)
                if cfg.format != "text":
                    ids, labels = encoded
                    cut = len(ids) > cfg.max_length
                    encoded = _truncated(ids, labels, cfg.max_length)
                    stats.truncated_rows += cut
            except _BadRow as bad:
                where = f"{source.name}, {label}"
                if not (cfg.skip_bad_rows and bad.skippable):
                    raise DataError(f"{where}: {bad}") from None
                if skipped == 0:
                    log.warning(
                        "skipping bad rows of %s (data.skip_bad_rows=true); the first: %s: %s", source.name, where, bad
                    )
                skipped += 1
                continue
            yield encoded
        if skipped:
            log.warning("skipped %d bad rows of %s", skipped, source.name)
        stats.skipped_rows += skipped


def pack(token_rows: Iterable[list[int]], block: int) -> Iterator[list[int]]:
    """Concatenate the rows and cut blocks of exactly `block` tokens; the tail that does not fill one is dropped."""
    buffer: list[int] = []
    for ids in token_rows:
        buffer.extend(ids)
        start = 0
        while len(buffer) - start >= block:
            yield buffer[start : start + block]
            start += block
        del buffer[:start]


def _examples(
    cfg: DataConfig, tokenizer: Any, sources: list[Source], scratch: Path, stats: DataStats
) -> Iterator[dict[str, list[int]]]:
    rows = _encoded_rows(cfg, tokenizer, sources, scratch, stats)
    if cfg.format == "text":
        pairs: Iterable[tuple[list[int], list[int]]] = ((ids, ids) for ids in pack(rows, cfg.max_length))
    else:
        pairs = rows
    for ids, labels in pairs:
        stats.examples += 1
        stats.tokens += len(ids)
        stats.supervised_tokens += sum(label != IGNORE_INDEX for label in labels)
        yield {"input_ids": ids, "labels": labels}


def _to_dataset(
    examples: Iterator[dict[str, list[int]]], scratch: Path, fingerprint: str, empty: Callable[[], str]
) -> datasets.Dataset:
    # from_generator fails on zero rows and wraps errors raised inside it: peek first, unwrap after.
    first = next(examples, None)
    if first is None:
        raise DataError(empty())
    try:
        return datasets.Dataset.from_generator(
            lambda: itertools.chain([first], examples),
            features=FEATURES,
            cache_dir=str(scratch),
            fingerprint=fingerprint,
        )
    except Exception as exc:
        cause: BaseException | None = exc
        while cause is not None and not isinstance(cause, DataError):
            cause = cause.__cause__ or cause.__context__
        if cause is not None:
            raise cause from None
        raise


# ---------------------------------------------------------------------------------------------------------------
# Cache


def file_digest(path: str | Path) -> str:
    """sha256 of a file's bytes; computed once per process for a file whose size, mtime, ctime and inode stay put
    (an edit that restores size and mtime still changes ctime)."""
    stat = os.stat(path)
    return _digest(str(path), stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns, stat.st_ino)


@functools.lru_cache(maxsize=256)
def _digest(path: str, size: int, mtime_ns: int, ctime_ns: int, inode: int) -> str:
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            sha.update(chunk)
    return sha.hexdigest()


def data_fingerprint(cfg: DataConfig) -> dict[str, str]:
    """Each source of data.path and data.eval_path -> the sha256 of its bytes (a hub dataset -> its split): what a
    checkpoint records so that a resume on edited data is refused."""
    configs = [
        replace(
            cfg, mixture=[], path=entry["path"], **{k: entry[k] for k in ("split", "subset", "revision") if k in entry}
        )
        for entry in cfg.mixture
    ] or [cfg]
    if cfg.eval_path:
        configs.append(replace(cfg, mixture=[], path=cfg.eval_path))
    return {
        s.name: ":".join(["hub", c.split, *filter(None, [c.subset, c.revision])])
        if s.kind == "hub"
        else file_digest(s.name)
        for c in configs
        for s in resolve_sources(c)
    }


def cache_key(cfg: DataConfig, sources: list[Source], tokenizer: Any) -> str:
    """sha256 over what determines the tokenized examples: sources (by their content), options, tokenizer."""
    located = [
        [s.name, cfg.split, cfg.subset, cfg.revision] if s.kind == "hub" else [s.name, file_digest(s.name)]
        for s in sources
    ]
    vocab = json.dumps(sorted(tokenizer.get_vocab().items()), ensure_ascii=False)
    identity = {
        "version": CACHE_VERSION,
        "sources": located,
        "format": cfg.format,
        "max_length": cfg.max_length,
        "text_field": cfg.text_field,
        "messages_field": cfg.messages_field,
        "conversations_field": cfg.conversations_field,
        # A skipping build holds fewer rows than a strict one would accept, so the two never share a cache.
        "skip_bad_rows": cfg.skip_bad_rows,
        "tokenizer": [
            type(tokenizer).__name__,
            len(tokenizer),
            hashlib.sha256(vocab.encode()).hexdigest(),
            getattr(tokenizer, "chat_template", None),
            [tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id],
        ],
    }
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()


@contextlib.contextmanager
def _quiet_datasets() -> Iterator[None]:
    # datasets' own per-split progress bars would interleave with the training bar; our log line says what was done.
    was_enabled = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if was_enabled:
            datasets.enable_progress_bars()


def _build_cache(cfg: DataConfig, tokenizer: Any, sources: list[Source], target: Path) -> None:
    with _quiet_datasets():
        _write_cache(cfg, tokenizer, sources, target)


def _write_cache(cfg: DataConfig, tokenizer: Any, sources: list[Source], target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{target.name[:16]}-", dir=target.parent))
    try:
        stats = DataStats()
        examples = _examples(cfg, tokenizer, sources, tmp / "scratch", stats)
        empty = functools.partial(_empty_message, cfg, stats)
        _to_dataset(examples, tmp / "scratch", target.name, empty).save_to_disk(str(tmp / "dataset"))
        (tmp / "stats.json").write_text(json.dumps(asdict(stats)))
        shutil.rmtree(tmp / "scratch")
        log.info(
            "tokenized %s: %d examples (%d tokens, %d supervised) from %d rows, %d skipped, %d truncated to "
            "data.max_length=%d",
            cfg.path,
            stats.examples,
            stats.tokens,
            stats.supervised_tokens,
            stats.rows,
            stats.skipped_rows,
            stats.truncated_rows,
            cfg.max_length,
        )
        try:
            tmp.rename(target)
        except OSError:
            if not target.is_dir():  # else another process finished the same cache first: keep theirs
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _empty_message(cfg: DataConfig, stats: DataStats) -> str:
    hint = f" (the text format needs at least {cfg.max_length} tokens for one block)" if cfg.format == "text" else ""
    return (
        f"data.path {cfg.path!r} yields no training examples: {stats.rows} rows read, {stats.skipped_rows} "
        f"skipped, format {cfg.format}, max_length {cfg.max_length}{hint}"
    )


def _load_cache(target: Path) -> tuple[datasets.Dataset, DataStats]:
    if not target.is_dir():
        raise DataError(
            f"no tokenized data cache at {target}: the main rank failed to build it or has not run (see its log)"
        )
    stats = DataStats(**json.loads((target / "stats.json").read_text()))
    stats.cache_path = str(target)
    return datasets.load_from_disk(str(target / "dataset")), stats


def load_examples_with_stats(
    cfg: DataConfig, tokenizer: Any, *, is_main: bool = True, barrier: Callable[[], None] | None = None
) -> tuple[datasets.Dataset, DataStats]:
    """`load_examples`, also returning what tokenization did (and whether this call hit the cache)."""
    failure: Exception | None = None
    target = Path()
    built = False
    try:
        sources = resolve_sources(cfg)
        cfg = detect_format(cfg, sources)
        _check_tokenizer(cfg, tokenizer)
        target = Path(cfg.cache_dir).expanduser() / cache_key(cfg, sources, tokenizer)
        if is_main and not target.is_dir():
            _build_cache(cfg, tokenizer, sources, target)
            built = True
    except Exception as exc:  # noqa: BLE001 - raised on every rank after the barrier
        # Held until after the barrier, so that a failing main rank never leaves the others waiting forever.
        failure = exc
    if barrier is not None:
        barrier()
    if failure is not None:
        raise failure
    dataset, stats = _load_cache(target)
    stats.cache_hit = not built
    if stats.cache_hit and is_main:
        log.info(
            "loaded %d tokenized examples of %s from the cache %s (%d rows skipped, %d truncated to data.max_length)",
            stats.examples,
            cfg.path,
            target,
            stats.skipped_rows,
            stats.truncated_rows,
        )
    return dataset, stats


def load_examples(
    cfg: DataConfig, tokenizer: Any, *, is_main: bool = True, barrier: Callable[[], None] | None = None
) -> datasets.Dataset:
    """Tokenized examples (`input_ids`, `labels` with -100 where no loss) of data.path, cached under cache_dir.

    In a multi-process run only the main rank tokenizes and writes the cache; every rank then calls `barrier`
    once, and the others read the cache. Raises DataError for unusable data, before any training starts.
    """
    return load_examples_with_stats(cfg, tokenizer, is_main=is_main, barrier=barrier)[0]
