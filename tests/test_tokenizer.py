"""Tokenizer: the SmolLM2 GGUF tokenizer against transformers on every eval prompt, chat templates,
Hugging Face directories and the GGUF pre-tokenizer table."""

from __future__ import annotations

import json
import logging
import re

import gguf
import pytest
from tokenizers import Tokenizer as Backend, pre_tokenizers

from conftest_weights import eval_questions, hf_smollm2_tokenizer, smollm2_path  # noqa: F401
from ppow_jax.errors import InputError
from ppow_jax.text.tokenizer import Tokenizer

CONVERSATION = [
    {"role": "user", "content": "Compose an engaging travel blog post about a recent trip to Hawaii."},
    {"role": "assistant", "content": "Aloha! Hawaii welcomed me with warm breezes and warmer people."},
    {"role": "user", "content": "Rewrite your previous response. Start every sentence with the letter A."},
]


@pytest.fixture(scope="module")
def tokenizer(smollm2_path) -> Tokenizer:
    return Tokenizer.from_gguf(smollm2_path)


@pytest.fixture(scope="module")
def digit_fixed_hf_backend(hf_smollm2_tokenizer) -> Backend:
    """transformers' GGUF tokenizer with SmolLM2's real pre-tokenizer (digits split one by one)."""
    backend = Backend.from_str(hf_smollm2_tokenizer.backend_tokenizer.to_str())
    backend.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    return backend


def _all_turns() -> list[str]:
    return [turn for question in eval_questions() for turn in question["turns"]]


def test_smollm2_special_ids(tokenizer):
    assert tokenizer.vocab_size == 49152
    assert tokenizer.bos_token_id == 1 and tokenizer.pad_token_id == 2
    # Metadata EOS is <|im_end|> (2) already; the template's turn end adds nothing new.
    assert tokenizer.eos_token_ids == (2,)
    assert tokenizer.encode("<|im_start|>user") == [1, 4093]
    assert len(tokenizer.encode("Hello")) == 1 and not tokenizer.add_bos  # this checkpoint adds no BOS


def test_encode_matches_transformers_on_eval_prompts(tokenizer, hf_smollm2_tokenizer, digit_fixed_hf_backend):
    # KNOWN DIFFERENCE: transformers 5.23's GGUF tokenizer has no entry for pre-tokenizer `smollm`
    # and falls back to GPT-2 splitting, which keeps runs of digits together ("2024" -> one
    # pre-token). llama.cpp (and SmolLM2's own tokenizer.json) split every digit on its own, as we
    # do. So prompts without digits must match transformers exactly, and prompts with digits must
    # match transformers' tokenizer once its pre-tokenizer is set to SmolLM2's real one,
    # Sequence[Digits(individual_digits=True), ByteLevel(add_prefix_space=False, use_regex=True)].
    turns = _all_turns()
    assert len(turns) >= 300
    with_digits = 0
    for turn in turns:
        ours = tokenizer.encode(turn)
        if re.search(r"\d", turn):
            with_digits += 1
            assert ours == digit_fixed_hf_backend.encode(turn, add_special_tokens=False).ids, turn
        else:
            assert ours == hf_smollm2_tokenizer.encode(turn, add_special_tokens=False), turn
    assert 0 < with_digits < len(turns)


def test_decode_inverts_encode(tokenizer):
    for turn in _all_turns():
        assert tokenizer.decode(tokenizer.encode(turn)) == turn


def test_chat_template_matches_transformers(tokenizer, hf_smollm2_tokenizer):
    for messages in (CONVERSATION, [{"role": "system", "content": "Be brief."}] + CONVERSATION):
        ours = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        theirs = hf_smollm2_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert ours == theirs
        assert tokenizer.encode(ours) == hf_smollm2_tokenizer.encode(theirs, add_special_tokens=False)
    ours = tokenizer.apply_chat_template(CONVERSATION[:1], add_generation_prompt=False)
    assert ours == hf_smollm2_tokenizer.apply_chat_template(CONVERSATION[:1], tokenize=False,
                                                            add_generation_prompt=False)
    assert ours.endswith("<|im_end|>\n")
    # Special tokens survive encoding whole and are dropped by the default decode.
    ids = tokenizer.encode(ours)
    assert ids.count(tokenizer.encode("<|im_start|>")[0]) == 2
    assert "<|im_start|>" not in tokenizer.decode(ids) and tokenizer.decode(ids, skip_special_tokens=False) == ours


def test_from_hf_directory(tmp_path, tokenizer, digit_fixed_hf_backend):
    # transformers 5 saves tokenizer.json, tokenizer_config.json and chat_template.jinja.
    import transformers

    transformers.PreTrainedTokenizerFast(tokenizer_object=digit_fixed_hf_backend).save_pretrained(tmp_path)
    config_path = tmp_path / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config.update(bos_token="<|im_start|>", eos_token={"content": "<|endoftext|>", "special": True},
                  pad_token="<|im_end|>")
    config_path.write_text(json.dumps(config))
    (tmp_path / "chat_template.jinja").write_text(tokenizer.chat_template)
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [0, 2]}))

    loaded = Tokenizer.from_hf_directory(tmp_path)
    assert loaded.eos_token_ids == (0, 2)
    assert (loaded.bos_token_id, loaded.pad_token_id, loaded.vocab_size) == (1, 2, 49152)
    assert loaded.apply_chat_template(CONVERSATION) == tokenizer.apply_chat_template(CONVERSATION)
    for turn in _all_turns()[::7]:
        assert loaded.encode(turn) == tokenizer.encode(turn)


def test_template_errors(tokenizer):
    with pytest.raises(InputError, match="no chat template"):
        Tokenizer(tokenizer.backend).apply_chat_template(CONVERSATION)
    strict = Tokenizer(tokenizer.backend, chat_template=(
            "{% if messages[0]['role'] != 'user' %}{{ raise_exception('first message must be from the user') }}"
            "{% endif %}{% for m in messages %}{{ m['content'] | tojson }}{% endfor %}"))
    assert strict.apply_chat_template([{"role": "user", "content": "héllo \"x\""}]) == '"héllo \\"x\\""'
    with pytest.raises(InputError, match="first message must be from the user"):
        strict.apply_chat_template([{"role": "assistant", "content": "hi"}])
    with pytest.raises(InputError, match="'role' string"):
        strict.apply_chat_template(["hello"])


# ---------------------------------------------------------------------------------------------
# GGUF pre-tokenizer table, on a toy vocabulary whose merges reveal the digit grouping.

def _toy_gguf(path, pre: str):
    byte_chars = [chr(c) for c in range(ord("0"), ord("9") + 1)] + ["a", "b", "Ġ"]
    tokens = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] + byte_chars + ["12", "123", "45", "12345", "ab"]
    merges = ["1 2", "12 3", "4 5", "123 45", "a b"]
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types([3, 3, 3] + [1] * (len(tokens) - 3))
    writer.add_token_merges(merges)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(0)
    writer.add_add_bos_token(True)
    writer.add_chat_template("{% for m in messages %}<|im_start|>{{ m['content'] }}<|im_end|>{% endfor %}")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return tokens


@pytest.mark.parametrize("pre, pieces", [
    ("smollm", ["1", "2", "3", "4", "5"]),
    ("qwen2", ["1", "2", "3", "4", "5"]),
    ("llama-bpe", ["123", "45"]),
    ("gpt2", ["12345"]),
    ("something-new", ["12345"]),  # unknown: GPT-2 splitting, with a warning
])
def test_gguf_pre_tokenizers(tmp_path, caplog, pre, pieces):
    tokens = _toy_gguf(tmp_path / "toy.gguf", pre)
    with caplog.at_level(logging.WARNING):
        toy = Tokenizer.from_gguf(tmp_path / "toy.gguf")
    assert ("unknown pre-tokenizer 'something-new'" in caplog.text) == (pre == "something-new")
    ids = toy.encode("12345")
    # add_bos_token is set: BOS first, but not twice when the text already starts with it.
    assert ids[0] == 1 and [tokens[i] for i in ids[1:]] == pieces
    rendered = toy.apply_chat_template([{"role": "user", "content": "ab"}])
    assert toy.encode(rendered) == [1, tokens.index("ab"), 2]
    # The template ends turns with <|im_end|>, so it stops generation next to the metadata EOS.
    assert toy.eos_token_ids == (0, 2)
