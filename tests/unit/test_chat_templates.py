"""Assistant masks for the chat templates of the families people fine-tune, each copied here in its behaviour (not
its exact text): the supervised tokens decode to exactly the assistant turns and the template's end-of-turn markup
(and, for Qwen3's last turn, the reasoning block it renders), from one rendering of the conversation."""

import pytest

from lisa_dist.data import load_examples
from lisa_dist.data.chat import encode_messages
from lisa_dist.data.rows import BadRow
from lisa_dist.errors import DataError
from lisa_dist.models.tokenizer import CHATML_TEMPLATE, byte_tokenizer

from .test_data import config, supervised_runs, write_jsonl

# Qwen3: reasoning blocks; assistant turns before the last user message lose theirs, the ones after it get one
# (empty when the message has none).
QWEN3 = (
    "{%- set ns = namespace(last=0) -%}"
    "{%- for m in messages %}{% if m.role == 'user' %}{% set ns.last = loop.index0 %}{% endif %}{% endfor -%}"
    "{%- for m in messages -%}"
    "{%- if m.role == 'assistant' -%}"
    "{%- set content = m.content -%}{%- set reasoning = m.reasoning_content or '' -%}"
    "{%- if '</think>' in content -%}"
    "{%- set reasoning = content.split('</think>')[0].split('<think>')[-1].strip('\\n') -%}"
    "{%- set content = content.split('</think>')[-1].lstrip('\\n') -%}{%- endif -%}"
    "{{ '<|im_start|>assistant\\n' }}"
    "{%- if loop.index0 > ns.last %}{{ '<think>\\n' + reasoning + '\\n</think>\\n\\n' }}{% endif -%}"
    "{{ content + '<|im_end|>\\n' }}"
    "{%- else %}{{ '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}{% endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif -%}"
)
# Llama-3.x: header ids, and a system header the template always writes (with its own dates) before the user's.
LLAMA3 = (
    "{{ '<|begin_of_text|>' }}"
    "{%- set system = messages[0].content if messages[0].role == 'system' else '' -%}"
    "{{ '<|start_header_id|>system<|end_header_id|>\\n\\nCutting Knowledge Date: December 2023\\n"
    "Today Date: 26 Jul 2024\\n\\n' + system + '<|eot_id|>' }}"
    "{%- for m in messages if m.role != 'system' -%}"
    "{{ '<|start_header_id|>' + m.role + '<|end_header_id|>\\n\\n' + m.content | trim + '<|eot_id|>' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif -%}"
)
# Gemma: no system role (its text opens the first user turn), the assistant's turn is named `model`.
GEMMA = (
    "{{ '<bos>' }}"
    "{%- set prefix = messages[0].content + '\\n\\n' if messages[0].role == 'system' else '' -%}"
    "{%- for m in messages if m.role != 'system' -%}"
    "{%- set role = 'model' if m.role == 'assistant' else m.role -%}"
    "{{ '<start_of_turn>' + role + '\\n' + (prefix if loop.first else '') + m.content | trim + '<end_of_turn>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif -%}"
)
# Mistral: [INST] ... [/INST], the system text merged into the first user turn, no generation prompt.
MISTRAL = (
    "{{ '<s>' }}"
    "{%- set system = messages[0].content + '\\n\\n' if messages[0].role == 'system' else '' -%}"
    "{%- for m in messages if m.role != 'system' -%}"
    "{%- if m.role == 'user' %}{{ '[INST] ' + (system if loop.first else '') + m.content + '[/INST]' }}"
    "{%- else %}{{ ' ' + m.content + '</s>' }}{% endif -%}"
    "{%- endfor -%}"
)
# ChatML with transformers' generation markers: the template itself says which tokens are the assistant's.
CHATML_MARKED = (
    "{% for m in messages %}{% if m.role == 'assistant' %}<|im_start|>assistant\n"
    "{% generation %}{{ m.content }}<|im_end|>{% endgeneration %}\n"
    "{% else %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

CONVERSATION = [
    {"role": "system", "content": "Answer briefly."},
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "4.", "reasoning_content": "Two and two make four."},
    {"role": "user", "content": "And 3+3?"},
    {"role": "assistant", "content": "6.", "reasoning_content": "Three and three make six."},
]
FAMILIES = {
    "chatml": (CHATML_TEMPLATE, ["4.<|im_end|>\n", "6.<|im_end|>\n"]),
    "qwen3": (QWEN3, ["4.<|im_end|>\n", "<think>\nThree and three make six.\n</think>\n\n6.<|im_end|>\n"]),
    "llama3": (LLAMA3, ["4.<|eot_id|>", "6.<|eot_id|>"]),
    "gemma": (GEMMA, ["4.<end_of_turn>\n", "6.<end_of_turn>\n"]),
    "mistral": (MISTRAL, ["4.</s>", "6.</s>"]),
    "generation-markers": (CHATML_MARKED, ["4.<|im_end|>", "6.<|im_end|>"]),
}


def tokenizer_with(template: str):
    tok = byte_tokenizer()
    tok.chat_template = template
    return tok


@pytest.mark.parametrize("family", list(FAMILIES))
def test_supervised_tokens_are_exactly_the_assistant_turns(family):
    template, expected = FAMILIES[family]
    tok = tokenizer_with(template)
    ids, labels = encode_messages([dict(m) for m in CONVERSATION], tok)
    # One rendering, as the model sees it at inference.
    assert ids == list(tok.apply_chat_template(CONVERSATION, tokenize=True, return_dict=True)["input_ids"])
    runs = [tok.decode(r, skip_special_tokens=False) for r in supervised_runs(ids, labels)]
    assert runs == expected


def test_qwen3_renders_earlier_turns_differently_and_still_trains():
    """What stopped every multi-turn Qwen3 run: rendering the conversation up to its first answer gives that answer a
    reasoning block the whole conversation does not have, so no prefix of the rendering marks the turn."""
    tok = tokenizer_with(QWEN3)
    through_first = tok.apply_chat_template(CONVERSATION[:3], tokenize=False)
    whole = tok.apply_chat_template(CONVERSATION, tokenize=False)
    assert not whole.startswith(through_first)
    # An answer with its reasoning inline: the template drops it from the earlier turn, keeps it in the last.
    inline = [dict(m) for m in CONVERSATION]
    inline[2] = {"role": "assistant", "content": "<think>\nadding\n</think>\n\n4."}
    ids, labels = encode_messages(inline, tok)
    assert next(tok.decode(r) for r in supervised_runs(ids, labels)) == "4.<|im_end|>\n"


def test_a_turn_the_template_rewrites_is_a_bad_row_that_can_be_skipped(tmp_path):
    shouting = tokenizer_with(CHATML_TEMPLATE.replace("{{ m['content'] }}", "{{ m['content'] | upper }}"))
    with pytest.raises(
        BadRow,
        match=r"message 1 \(user\) is not where the chat template's rendering should have "
        r"it: its turns cannot be located",
    ):
        encode_messages([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}], shouting)
    rows = [
        {"messages": [{"role": "user", "content": "HI"}, {"role": "assistant", "content": "HELLO"}]},
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]},
    ]
    path = write_jsonl(tmp_path / "c.jsonl", rows)
    with pytest.raises(DataError, match=r"c.jsonl, line 2: message 1 \(user\) is not where"):
        load_examples(config(tmp_path, path, "chat"), shouting)
    assert len(load_examples(config(tmp_path / "skip", path, "chat", skip_bad_rows=True), shouting)) == 1


# ChatML with tool calls, as Qwen's templates write them.
TOOLS = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{% if m.content %}{{ m.content }}{% endif %}"
    "{% for c in m.tool_calls or [] %}<tool_call>{{ c.function | tojson }}</tool_call>{% endfor %}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CALL = {"type": "function", "function": {"name": "add", "arguments": {"a": 2, "b": 2}}}
TOOL_ROWS = [
    {
        "messages": [
            {"role": "system", "content": "You can call add."},
            {"role": "user", "content": "What is 2+2?"},
            {"role": "assistant", "content": None, "tool_calls": [CALL]},
            {"role": "tool", "content": "4", "tool_call_id": "0"},
            {"role": "assistant", "content": "2+2 is 4."},
        ]
    }
]
SHAREGPT_ROWS = [
    {
        "conversations": [
            {"from": "system", "value": "You can call add."},
            {"from": "human", "value": "What is 2+2?"},
            {"from": "function_call", "value": '{"name": "add", "arguments": {"a": 2, "b": 2}}'},
            {"from": "observation", "value": "4"},
            {"from": "gpt", "value": "2+2 is 4."},
        ]
    }
]


def _runs(ds, tok):
    return [tok.decode(r, skip_special_tokens=False) for r in supervised_runs(ds[0]["input_ids"], ds[0]["labels"])]


def test_openai_tool_calls_are_supervised_and_tool_turns_are_not(tmp_path):
    tok = tokenizer_with(TOOLS)
    ds = load_examples(config(tmp_path, write_jsonl(tmp_path / "t.jsonl", TOOL_ROWS), "chat"), tok)
    assert _runs(ds, tok) == [
        '<tool_call>{"name": "add", "arguments": {"a": 2, "b": 2}}</tool_call><|im_end|>\n',
        "2+2 is 4.<|im_end|>\n",
    ]


@pytest.mark.parametrize("fmt", ["sharegpt", "auto"])
def test_sharegpt_turns_by_from_and_value(tmp_path, fmt):
    tok = byte_tokenizer()
    ds = load_examples(config(tmp_path, write_jsonl(tmp_path / "s.jsonl", SHAREGPT_ROWS), fmt), tok)
    assert _runs(ds, tok) == ['{"name": "add", "arguments": {"a": 2, "b": 2}}<|im_end|>\n', "2+2 is 4.<|im_end|>\n"]
    bad = [{"conversations": [{"from": "narrator", "value": "Once"}, {"from": "gpt", "value": "upon"}]}]
    with pytest.raises(DataError, match=r"b.jsonl, line 1: turn 1 is from 'narrator', expected one of human, user, "):
        load_examples(config(tmp_path / "bad", write_jsonl(tmp_path / "b.jsonl", bad), fmt), tok)


@pytest.mark.parametrize(
    ("rows", "expected"),
    [
        (TOOL_ROWS, "chat"),
        (SHAREGPT_ROWS, "sharegpt"),
        ([{"instruction": "Hi", "output": "Hello"}], "alpaca"),
        ([{"text": "Plain text. " * 20}], "text"),
    ],
)
def test_auto_detects_the_format_from_the_first_row(tmp_path, rows, expected):
    from lisa_dist.data import resolve_sources
    from lisa_dist.data.sources import detect_format

    cfg = config(tmp_path, write_jsonl(tmp_path / "a.jsonl", rows), "auto")
    assert detect_format(cfg, resolve_sources(cfg)).format == expected


def test_auto_and_explicit_formats_name_the_fields_they_expected(tmp_path):
    path = write_jsonl(tmp_path / "q.jsonl", [{"question": "Hi", "answer": "Hello"}])
    with pytest.raises(
        DataError,
        match=r"data.format=auto: \S*q.jsonl, line 1 has fields 'question', 'answer'; "
        r"expected 'messages' \(chat\), 'conversations' \(sharegpt\), 'instruction' "
        r"and 'output' \(alpaca\) or 'text' \(text\)",
    ):
        load_examples(config(tmp_path, path, "auto"), byte_tokenizer())
    with pytest.raises(DataError, match=r"q.jsonl, line 1: missing field 'conversations'"):
        load_examples(config(tmp_path, path, "sharegpt"), byte_tokenizer())


def test_chat_template_option_replaces_or_gives_the_template(tmp_path):
    from lisa_dist.config import load_config
    from lisa_dist.data import use_chat_template
    from lisa_dist.errors import ConfigError

    tok = byte_tokenizer()
    tok.chat_template = None
    use_chat_template(tok, "chatml")
    assert "<|im_start|>" in tok.chat_template
    (tmp_path / "gemma.jinja").write_text(GEMMA)
    use_chat_template(tok, str(tmp_path / "gemma.jinja"))
    assert tok.chat_template == GEMMA
    with pytest.raises(
        ConfigError,
        match=r"data.chat_template='llama9' is not allowed: expected a Jinja file or one "
        r"of chatml",
    ):
        load_config(None, [f"--data.path={tmp_path / 'gemma.jinja'}", "--data.chat_template=llama9"])


def test_a_tokenizer_without_offsets_is_named():
    class SlowTokenizer:
        chat_template, is_fast = CHATML_TEMPLATE, False

    with pytest.raises(
        BadRow, match="SlowTokenizer gives no character offsets, which locating the assistant turns needs"
    ) as failure:
        encode_messages([dict(m) for m in CONVERSATION], SlowTokenizer())
    assert not failure.value.skippable  # every row would fail alike: not a row to skip
