"""Trying a model: answers from an exported folder or a checkpoint, the prompt it was trained on, the CLI."""

import io
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

from lisa_dist import cli, tools
from lisa_dist.config import load_config
from lisa_dist.data import ALPACA_PROMPT_NO_INPUT
from lisa_dist.data.sources import encode_alpaca
from lisa_dist.errors import ConfigError
from lisa_dist.models import IGNORE_INDEX, byte_tokenizer, preset_config
from lisa_dist.run import train
from lisa_dist.tools import generate, load_for_generation
from lisa_dist.tools.generation import build_prompt

from ..helpers import tiny_overrides

TEMPLATE = (
    "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}[assistant] {% endif %}"
)


def _save_tiny(folder, chat_template):
    torch.manual_seed(0)
    config = preset_config("tiny-llama", {"num_hidden_layers": 2, "hidden_size": 32})
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tokenizer = byte_tokenizer()
    tokenizer.chat_template = chat_template
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return _save_tiny(tmp_path_factory.mktemp("chat-model"), TEMPLATE)


@pytest.fixture(scope="module")
def alpaca_folder(tmp_path_factory):
    return _save_tiny(tmp_path_factory.mktemp("alpaca-model"), None)


def _spy_generate(monkeypatch, model):
    """Record every (input ids, output ids) of model.generate."""
    calls, real = [], model.generate

    def spy(ids, **kwargs):
        out = real(ids, **kwargs)
        calls.append((ids, out))
        return out

    monkeypatch.setattr(model, "generate", spy)
    return calls


def test_greedy_answers_are_deterministic_bounded_and_start_at_the_argmax(folder, monkeypatch):
    model, tokenizer = load_for_generation(folder)
    assert not model.training and next(model.parameters()).dtype == torch.float32
    calls = _spy_generate(monkeypatch, model)
    first = generate(model, tokenizer, "hello", max_new_tokens=6)
    assert isinstance(first, str) and generate(model, tokenizer, "hello", max_new_tokens=6) == first
    ids, out = calls[0]
    new = out[0, ids.shape[1] :]
    assert len(new) == 6 or (len(new) < 6 and new[-1] == tokenizer.eos_token_id)
    assert first == tokenizer.decode(new, skip_special_tokens=True)
    with torch.no_grad():
        assert new[0] == model(input_ids=ids).logits[0, -1].argmax()
    assert generate(model, tokenizer, "hello", max_new_tokens=2) == tokenizer.decode(new[:2], skip_special_tokens=True)


def test_sampling_is_seeded_and_keeps_the_callers_random_state(folder):
    model, tokenizer = load_for_generation(folder)
    state = torch.random.get_rng_state()
    answers = [generate(model, tokenizer, "hello", max_new_tokens=12, temperature=1.0, seed=s) for s in (1, 1, 2)]
    assert answers[0] == answers[1] != answers[2]
    assert torch.equal(torch.random.get_rng_state(), state)
    for bad in ({"temperature": -1.0}, {"top_p": 0.0}, {"max_new_tokens": 0}):
        with pytest.raises(ConfigError, match=next(iter(bad))):
            generate(model, tokenizer, "hello", **bad)


def test_a_chat_template_renders_system_history_and_the_generation_prompt(folder, monkeypatch):
    model, tokenizer = load_for_generation(folder)
    history = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    messages = [{"role": "system", "content": "be brief"}, *history, {"role": "user", "content": "why?"}]
    expected = list(
        tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    )
    assert tokenizer.decode(expected).endswith("[user] why?\n[assistant] ")
    assert build_prompt(tokenizer, "why?", system="be brief", history=history) == expected
    calls = _spy_generate(monkeypatch, model)
    generate(model, tokenizer, "why?", max_new_tokens=1, system="be brief", history=history)
    assert calls[0][0][0].tolist() == expected


def test_without_a_chat_template_the_prompt_is_alpacas_as_lisa_dist_trains_it(alpaca_folder):
    _, tokenizer = load_for_generation(alpaca_folder)
    assert tokenizer.chat_template is None
    instruction = "Name a colour."
    ids = build_prompt(tokenizer, instruction)
    trained, labels = encode_alpaca({"instruction": instruction, "output": "Blue."}, tokenizer, 0)
    assert ids == [t for t, label in zip(trained, labels, strict=True) if label == IGNORE_INDEX]
    assert tokenizer.decode(ids, skip_special_tokens=True) == ALPACA_PROMPT_NO_INPUT.format(instruction=instruction)
    with pytest.raises(ConfigError, match="no chat template"):
        build_prompt(tokenizer, "hi", system="be brief")


def test_a_checkpoint_loads_as_its_export_does(tmp_path, data_file):
    train(load_config(None, tiny_overrides(tmp_path, data_file, "--train.steps=2", "--checkpoint.every=2")))
    root = tmp_path / "run" / "checkpoints"
    assert cli.main(["export", str(root), str(tmp_path / "hf")]) == 0
    probe = torch.arange(24, dtype=torch.long).reshape(2, 12) % 200 + 5
    exported, tokenizer = load_for_generation(tmp_path / "hf")
    with torch.no_grad():
        expected = exported(input_ids=probe).logits
        for source in (root, root / "step-2"):
            model, _ = load_for_generation(source)
            assert not model.training
            torch.testing.assert_close(model(input_ids=probe).logits, expected, rtol=0, atol=1e-6)
    assert generate(model, tokenizer, "hi", max_new_tokens=8) == generate(exported, tokenizer, "hi", max_new_tokens=8)


def test_cli_generate_prints_each_answer(folder, capsys):
    model, tokenizer = load_for_generation(folder)
    answers = [generate(model, tokenizer, p, max_new_tokens=5) for p in ("hi", "yo")]
    assert cli.main(["generate", str(folder), "--prompt", "hi", "--max-new-tokens", "5"]) == 0
    assert capsys.readouterr().out == answers[0] + "\n"
    assert cli.main(["generate", str(folder), "--prompt", "hi", "--prompt", "yo", "--max-new-tokens", "5"]) == 0
    assert capsys.readouterr().out == f"> hi\n{answers[0]}\n\n> yo\n{answers[1]}\n\n"


def _chat(monkeypatch, folder, lines):
    """Run `lisa-dist chat` on stdin `lines`; the history each turn was answered with."""
    histories, real = [], tools.generate

    def recording(model, tokenizer, prompt, history=None, **kwargs):
        histories.append(None if history is None else list(history))
        return real(model, tokenizer, prompt, history=history, **kwargs)

    monkeypatch.setattr(tools, "generate", recording)
    monkeypatch.setattr(sys, "stdin", io.StringIO(lines))
    assert cli.main(["chat", str(folder), "--max-new-tokens", "3"]) == 0
    return histories


def test_cli_chat_keeps_the_conversation_until_reset(folder, alpaca_folder, monkeypatch, capsys):
    histories = _chat(monkeypatch, folder, "hello\nagain\n/reset\n\nhi\n/exit\nnot read\n")
    assert [len(h) for h in histories] == [0, 2, 0]
    assert histories[1][0] == {"role": "user", "content": "hello"}
    assert capsys.readouterr().out.count("> ") == 6
    # Without a chat template every line stands alone; end of input ends the chat too.
    assert _chat(monkeypatch, alpaca_folder, "hello\nagain\n") == [None, None]


def test_cli_names_a_path_that_is_no_model(tmp_path, folder, capsys):
    assert cli.main(["generate", str(tmp_path / "nowhere"), "--prompt", "hi"]) == 2
    err = capsys.readouterr().err
    assert "lisa-dist: config error:" in err and str(tmp_path / "nowhere") in err and "checkpoint" in err
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text((folder / "config.json").read_text())
    assert cli.main(["chat", str(tmp_path / "broken")]) == 2
    assert "does not load as a Hugging Face model folder" in capsys.readouterr().err
    with pytest.raises(SystemExit) as stop:  # refused as the arguments are read, before the model loads
        cli.main(["generate", str(folder), "--prompt", "hi", "--temperature", "-1"])
    assert (
        stop.value.code == 2 and "argument --temperature: '-1': expected a value in [0, 100]" in capsys.readouterr().err
    )
