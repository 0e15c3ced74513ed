"""Conversations to token ids and labels, supervised exactly on the assistant turns, for any chat template.

A conversation is rendered once, as the model will see it, and tokenized. Where the template marks the assistant's
tokens (`{% generation %}`), transformers' `return_assistant_tokens_mask` gives them. Otherwise each assistant turn
is found in that one rendering by characters, mapped to tokens by the tokenizer's offsets: from the end of the
assistant header the template writes (what `add_generation_prompt` adds, so a reasoning block the template renders
for the turn is inside) through the message and the template's end-of-turn markup (what follows a final assistant
message, e.g. `<|im_end|>`, `<|eot_id|>`, `<end_of_turn>`, `</s>`). Nothing requires a prefix of the conversation to
render as a prefix of the whole (Qwen3 renders earlier assistant turns without their reasoning). A turn that cannot
be found is a bad row, which `data.skip_bad_rows` can skip.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jinja2

from lisa_dist.data.rows import BadRow
from lisa_dist.models import IGNORE_INDEX

ROLES = ("system", "user", "assistant", "tool")
# ShareGPT's `from` values (LLaMA-Factory's and FastChat's spellings) -> roles; a function call is the model's turn.
SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "model": "assistant",
    "function_call": "assistant",
    "system": "system",
    "tool": "tool",
    "observation": "tool",
    "function": "tool",
}
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# Llama 3.1's chat template, as its Instruct tokenizers publish it, in behaviour: a system header always written
# (knowledge cutoff, the date, the system message trimmed), each turn `<|start_header_id|>role<|end_header_id|>\n\n`
# + content trimmed + `<|eot_id|>`; one JSON tool call per assistant turn ({"name", "parameters"}); tool results as
# `ipython` turns, JSON-encoded; `tools` (a custom tool list) in the first user turn, or in the system turn with
# tools_in_user_message=false. For base models (Llama-3.1-70B) whose tokenizer carries no chat template.
LLAMA3 = (
    "{{- bos_token }}"
    "{%- if custom_tools is defined %}{%- set tools = custom_tools %}{%- endif %}"
    "{%- if not tools_in_user_message is defined %}{%- set tools_in_user_message = true %}{%- endif %}"
    "{%- if not date_string is defined %}{%- set date_string = '26 Jul 2024' %}{%- endif %}"
    "{%- if not tools is defined %}{%- set tools = none %}{%- endif %}"
    "{%- if messages[0]['role'] == 'system' %}"
    "{%- set system_message = messages[0]['content'] | trim %}{%- set messages = messages[1:] %}"
    "{%- else %}{%- set system_message = '' %}{%- endif %}"
    "{{- '<|start_header_id|>system<|end_header_id|>\\n\\n' }}"
    "{%- if builtin_tools is defined or tools is not none %}{{- 'Environment: ipython\\n' }}{%- endif %}"
    "{%- if builtin_tools is defined %}"
    "{{- 'Tools: ' + builtin_tools | reject('equalto', 'code_interpreter') | join(', ') + '\\n\\n' }}{%- endif %}"
    "{{- 'Cutting Knowledge Date: December 2023\\n' }}{{- 'Today Date: ' + date_string + '\\n\\n' }}"
    '{%- set tools_prompt = \'Respond in the format {"name": function name, "parameters": dictionary of argument '
    "name and its value}.Do not use variables.\\n\\n' %}"
    "{%- if tools is not none and not tools_in_user_message %}"
    "{{- 'You have access to the following functions. To call a function, please respond with JSON for a function "
    "call.' + tools_prompt }}"
    "{%- for t in tools %}{{- t | tojson(indent=4) }}{{- '\\n\\n' }}{%- endfor %}{%- endif %}"
    "{{- system_message }}{{- '<|eot_id|>' }}"
    "{%- if tools_in_user_message and not tools is none %}"
    "{%- if messages | length != 0 %}"
    "{%- set first_user_message = messages[0]['content'] | trim %}{%- set messages = messages[1:] %}"
    "{%- else %}"
    "{{- raise_exception('Cannot put tools in the first user message when there\\'s no first user message!') }}"
    "{%- endif %}"
    "{{- '<|start_header_id|>user<|end_header_id|>\\n\\n' -}}"
    "{{- 'Given the following functions, please respond with a JSON for a function call with its proper arguments "
    "that best answers the given prompt.\\n\\n' + tools_prompt }}"
    "{%- for t in tools %}{{- t | tojson(indent=4) }}{{- '\\n\\n' }}{%- endfor %}"
    "{{- first_user_message + '<|eot_id|>' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if not (message.role == 'ipython' or message.role == 'tool' or 'tool_calls' in message) %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim"
    " + '<|eot_id|>' }}"
    "{%- elif 'tool_calls' in message %}"
    "{%- if not message.tool_calls | length == 1 %}"
    "{{- raise_exception('This model only supports single tool-calls at once!') }}{%- endif %}"
    "{%- set tool_call = message.tool_calls[0].function %}"
    "{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}"
    "{%- if builtin_tools is defined and tool_call.name in builtin_tools %}"
    "{{- '<|python_tag|>' + tool_call.name + '.call(' }}"
    "{%- for arg_name, arg_val in tool_call.arguments | items %}"
    "{{- arg_name + '=\"' + arg_val + '\"' }}{%- if not loop.last %}{{- ', ' }}{%- endif %}{%- endfor %}"
    "{{- ')' }}"
    "{%- else %}"
    "{{- '{\"name\": \"' + tool_call.name + '\", ' }}{{- '\"parameters\": ' }}{{- tool_call.arguments | tojson }}"
    "{{- '}' }}"
    "{%- endif %}"
    "{%- if builtin_tools is defined %}{{- '<|eom_id|>' }}{%- else %}{{- '<|eot_id|>' }}{%- endif %}"
    "{%- elif message.role == 'tool' or message.role == 'ipython' %}"
    "{{- '<|start_header_id|>ipython<|end_header_id|>\\n\\n' }}"
    "{%- if message.content is mapping or message.content is iterable %}{{- message.content | tojson }}"
    "{%- else %}{{- message.content }}{%- endif %}"
    "{{- '<|eot_id|>' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)
BUILTIN_TEMPLATES = {"chatml": CHATML, "llama3": LLAMA3}
"""data.chat_template's named templates (config.CHAT_TEMPLATES)."""
PROBE_USER, PROBE_ASSISTANT = "\x01probe-user\x01", "\x01probe-assistant\x01"
REASONING_END = "</think>"


def parse_messages(row: Mapping[str, Any], field: str) -> list[dict[str, Any]]:
    """The row's messages, checked: each a {role, content} mapping (an assistant's content may be empty when it
    carries `tool_calls`); `tool_calls`, `name`, `tool_call_id` and `reasoning_content` go to the template as they
    are."""
    messages = []
    for number, message in enumerate(_listed(row, field, "messages"), start=1):
        if not isinstance(message, Mapping):
            raise BadRow(f"message {number} is {type(message).__name__}, not a {{role, content}} mapping")
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise BadRow(f"message {number} has role {role!r}, expected one of {', '.join(ROLES)}")
        calls = message.get("tool_calls")
        if content is None and role == "assistant" and calls:
            content = ""
        if not isinstance(content, str):
            raise BadRow(f"message {number} content is {type(content).__name__}, not str")
        kept = {"role": role, "content": content}
        kept.update(
            {
                k: message[k]
                for k in ("tool_calls", "name", "tool_call_id", "reasoning_content")
                if message.get(k) is not None
            }
        )
        messages.append(kept)
    if not any(m["role"] == "assistant" for m in messages):
        raise BadRow("no assistant message: nothing to learn from")
    return messages


def sharegpt_messages(row: Mapping[str, Any], field: str) -> list[dict[str, Any]]:
    """A ShareGPT row's `field` turns ({from, value}) as messages, checked as `parse_messages` checks them."""
    messages = []
    for number, turn in enumerate(_listed(row, field, "turns"), start=1):
        if not isinstance(turn, Mapping):
            raise BadRow(f"turn {number} is {type(turn).__name__}, not a {{from, value}} mapping")
        role = SHAREGPT_ROLES.get(str(turn.get("from")))
        if role is None:
            raise BadRow(f"turn {number} is from {turn.get('from')!r}, expected one of {', '.join(SHAREGPT_ROLES)}")
        messages.append({"role": role, "content": turn.get("value")})
    return parse_messages({field: messages}, field)


def _listed(row: Mapping[str, Any], field: str, items: str) -> list[Any]:
    """The row's non-empty list under `field` (of `items`, for the error)."""
    value = row.get(field)
    if value is None:
        raise BadRow(f"missing field '{field}'")
    if not isinstance(value, list) or not value:
        raise BadRow(f"field '{field}' is {type(value).__name__}, not a non-empty list of {items}")
    return value


def use_chat_template(tokenizer: Any, spec: str) -> None:
    """data.chat_template: a built-in's name or a Jinja file replaces the tokenizer's template ('' keeps it)."""
    if spec:
        tokenizer.chat_template = BUILTIN_TEMPLATES.get(spec) or Path(spec).expanduser().read_text()


def encode_messages(messages: list[dict[str, Any]], tokenizer: Any) -> tuple[list[int], list[int]]:
    """(input ids, labels) of the conversation: labels are the ids on the assistant turns, IGNORE_INDEX elsewhere."""
    template = tokenizer.chat_template or ""
    if "{% generation %}" in template or "{%- generation %}" in template:
        return _by_markers(messages, tokenizer)
    if not getattr(tokenizer, "is_fast", False):
        raise BadRow(
            f"{type(tokenizer).__name__} gives no character offsets, which locating the assistant turns "
            "needs: load the fast tokenizer (tokenizers), or use a chat template with {% generation %} "
            "markers",
            skippable=False,
        )
    text = _render(tokenizer, messages, generation_prompt=False)
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = list(encoded["input_ids"]), encoded["offset_mapping"]
    spans = assistant_spans(messages, text, *_markup(tokenizer))
    labels = [IGNORE_INDEX] * len(ids)
    for i, (start, end) in enumerate(offsets):
        if any(start < high and end > low for low, high in spans):
            labels[i] = ids[i]
    if all(label == IGNORE_INDEX for label in labels):
        raise BadRow("no token of the assistant turns is left after tokenizing")
    return ids, labels


def _by_markers(messages: list[dict[str, Any]], tokenizer: Any) -> tuple[list[int], list[int]]:
    try:
        out = tokenizer.apply_chat_template(
            messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
        )
    except jinja2.TemplateError as exc:
        raise BadRow(f"the chat template rejects this conversation: {exc}") from exc
    ids, mask = list(out["input_ids"]), list(out["assistant_masks"])
    if not any(mask):
        raise BadRow("the chat template's {% generation %} markers cover no token of this conversation")
    return ids, [t if m else IGNORE_INDEX for t, m in zip(ids, mask, strict=True)]


def _render(tokenizer: Any, messages: list[dict[str, Any]], generation_prompt: bool) -> str:
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    except jinja2.TemplateError as exc:
        raise BadRow(f"the chat template rejects this conversation: {exc}") from exc


def _markup(tokenizer: Any) -> tuple[str, str]:
    """The template's assistant header (what add_generation_prompt appends) and end-of-turn markup (what follows a
    final assistant message), from a probe conversation; '' where it has none."""
    user = [{"role": "user", "content": PROBE_USER}]
    try:
        bare = tokenizer.apply_chat_template(user, tokenize=False, add_generation_prompt=False)
        prompted = tokenizer.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
        whole = tokenizer.apply_chat_template(
            [*user, {"role": "assistant", "content": PROBE_ASSISTANT}], tokenize=False, add_generation_prompt=False
        )
    except jinja2.TemplateError as exc:
        raise BadRow(f"the chat template rejects a user turn followed by an assistant turn: {exc}") from exc
    header = prompted[len(bare) :] if prompted.startswith(bare) else ""
    at = whole.find(PROBE_ASSISTANT)
    end_of_turn = whole[at + len(PROBE_ASSISTANT) :] if at >= 0 else ""
    return (header if header.strip() else ""), end_of_turn


def assistant_spans(
    messages: list[dict[str, Any]],
    text: str,
    header: str,
    end_of_turn: str,
) -> list[tuple[int, int]]:
    """The character span of each assistant turn in `text`, the conversation's one rendering (see the module's
    docstring). User, tool and assistant contents are found in order; a system message may be moved, merged or
    replaced by the template, so it is not looked for."""
    found: list[tuple[int, int] | None] = []
    cursor = 0
    for number, message in enumerate(messages, start=1):
        if message["role"] == "system":
            found.append(None)
            continue
        place = _find(text, message["content"], cursor)
        if place is None and message["content"].strip():
            raise BadRow(
                f"message {number} ({message['role']}) is not where the chat template's rendering should "
                "have it: its turns cannot be located"
            )
        found.append(place)
        if place is not None:
            cursor = place[1]
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        low = max((p[1] for p in found[:i] if p is not None), default=0)
        high = min((p[0] for p in found[i + 1 :] if p is not None), default=len(text))
        spans.append(_turn(text, found[i], low, high, header, end_of_turn))
    return spans


def _find(text: str, content: str, cursor: int) -> tuple[int, int] | None:
    """Where `content` (trimmed, as templates often trim) is rendered at or after `cursor`; a content with an inline
    reasoning block is also looked for by its answer (templates drop earlier turns' reasoning)."""
    for needle in (content.strip(), content.rsplit(REASONING_END, 1)[-1].strip()):
        if needle:
            at = text.find(needle, cursor)
            if at >= 0:
                return at, at + len(needle)
    return None


def _turn(
    text: str,
    place: tuple[int, int] | None,
    low: int,
    high: int,
    header: str,
    end_of_turn: str,
) -> tuple[int, int]:
    """One assistant turn's span, between the previous message's end `low` and the next one's start `high`."""
    if place is None:  # only tool calls: from the header to the end of turn
        opened = text.find(header, low, high) if header else -1
        start = end = opened + len(header) if opened >= 0 else low
    else:
        start, end = place
        opened = text.rfind(header, low, start) if header else -1
        if opened >= 0:
            start = opened + len(header)  # a reasoning block the template writes before the answer is the turn's
    # The markup as a final turn has it (a separator after it may be missing mid-conversation, or at the end).
    for markup in dict.fromkeys((end_of_turn, end_of_turn.rstrip())):
        closed = text.find(markup, end, high) if markup.strip() else -1
        if closed >= 0:
            return start, closed + len(markup)
    return start, end
