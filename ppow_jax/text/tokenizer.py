"""Tokenizer and chat template of a checkpoint, from a GGUF file or a Hugging Face directory.

GGUF files carry a byte-level BPE vocabulary (tokens + merges) and name the pre-tokenizer that
llama.cpp uses (`tokenizer.ggml.pre`); we rebuild the same pipeline with `tokenizers`.
"""

from __future__ import annotations

import datetime
import json
import logging
import pathlib
from typing import Any, Callable, Optional, Sequence, Union

import jinja2
import jinja2.ext
import jinja2.sandbox
import tokenizers
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers

from ppow_jax.errors import CheckpointError, InputError

logger = logging.getLogger(__name__)

# GGUF token types (llama.cpp's llama_token_type).
_CONTROL = 3
_USER_DEFINED = 4

# Markers that end a chat turn; a template that uses one makes it a stop token alongside EOS.
_TURN_END_MARKERS = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>")

# Split patterns of llama.cpp's pre-tokenizers (the cl100k-style pattern, and Qwen2's variant
# that isolates every digit).
_LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                   r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                  r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


def _gpt2() -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)


def _smollm() -> pre_tokenizers.PreTokenizer:
    # llama.cpp splits on \p{N} (every digit alone) and then applies the GPT-2 pattern.
    return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), _gpt2()])


def _split_then_bytes(pattern: str) -> Callable[[], pre_tokenizers.PreTokenizer]:
    def build() -> pre_tokenizers.PreTokenizer:
        return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
                                        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    return build


# tokenizer.ggml.pre -> (pre-tokenizer builder, NFC normalization, BPE ignore_merges).
_PRE_TOKENIZERS: dict[str, tuple[Callable[[], pre_tokenizers.PreTokenizer], bool, bool]] = {
    "default": (_gpt2, False, False),
    "gpt2": (_gpt2, False, False),
    "smollm": (_smollm, False, False),
    "llama-bpe": (_split_then_bytes(_LLAMA3_PATTERN), False, True),
    "llama3": (_split_then_bytes(_LLAMA3_PATTERN), False, True),
    "qwen2": (_split_then_bytes(_QWEN2_PATTERN), True, False),
}


def _raise_exception(message: str) -> None:
    raise InputError(f"chat template error: {message}")


def _tojson(value: Any, indent: Optional[int] = None) -> str:
    # Jinja's own tojson HTML-escapes; chat templates expect plain JSON, as in transformers.
    return json.dumps(value, ensure_ascii=False, indent=indent)


def _strftime_now(fmt: str) -> str:
    return datetime.datetime.now().strftime(fmt)


def _token_text(value: Any) -> Optional[str]:
    """A special token from tokenizer_config.json: a string or an AddedToken-style dict."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


class Tokenizer:
    """Text <-> token ids, stop tokens and chat formatting of one checkpoint."""

    def __init__(self, backend: tokenizers.Tokenizer, *, bos_token: Optional[str] = None,
                 eos_token_ids: Sequence[int] = (), pad_token: Optional[str] = None,
                 chat_template: Optional[str] = None, add_bos: bool = False):
        self._backend = backend
        self._bos_token = bos_token
        self.bos_token_id = backend.token_to_id(bos_token) if bos_token is not None else None
        self.pad_token_id = backend.token_to_id(pad_token) if pad_token is not None else None
        self.add_bos = add_bos and self.bos_token_id is not None
        self.chat_template = chat_template
        stops = list(dict.fromkeys(int(i) for i in eos_token_ids))
        for marker in _TURN_END_MARKERS:
            marker_id = backend.token_to_id(marker)
            if chat_template and marker in chat_template and marker_id is not None and marker_id not in stops:
                stops.append(marker_id)
        self.eos_token_ids: tuple[int, ...] = tuple(stops)
        self._eos_token = backend.id_to_token(stops[0]) if stops else None
        self._template: Optional[jinja2.Template] = None

    @property
    def vocab_size(self) -> int:
        return self._backend.get_vocab_size(with_added_tokens=True)

    @property
    def backend(self) -> tokenizers.Tokenizer:
        return self._backend

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        """Token ids of `text`; special-token strings in it (e.g. `<|im_start|>`) become single ids.

        BOS is prepended only when the checkpoint asks for it and the text does not already begin
        with it (a chat template that writes BOS itself would otherwise get two); `add_bos=False`
        for a text that continues another (a response after its prompt) never gets one.
        """
        ids = self._backend.encode(text, add_special_tokens=False).ids
        if add_bos and self.add_bos and not (self._bos_token and text.startswith(self._bos_token)):
            ids = [self.bos_token_id] + ids
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self._backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True,
                            **template_vars: Any) -> str:
        """Renders a conversation with the checkpoint's own Jinja template (as transformers does)."""
        if not self.chat_template:
            raise InputError("this checkpoint has no chat template; pass raw prompts instead")
        for message in messages:
            if not isinstance(message, dict) or not isinstance(message.get("role"), str):
                raise InputError(f"each chat message must be a dict with a 'role' string, got {message!r}")
        if self._template is None:
            env = jinja2.sandbox.ImmutableSandboxedEnvironment(
                    trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
            env.filters["tojson"] = _tojson
            env.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now)
            try:
                self._template = env.from_string(self.chat_template)
            except jinja2.TemplateError as e:
                raise CheckpointError(f"the checkpoint's chat template does not parse: {e}") from e
        try:
            return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                         bos_token=self._bos_token or "", eos_token=self._eos_token or "",
                                         **template_vars)
        except jinja2.TemplateError as e:
            raise InputError(f"chat template failed on these messages: {e}") from e

    @classmethod
    def from_gguf(cls, path: Union[str, pathlib.Path], reader: Any = None) -> "Tokenizer":
        """The byte-level BPE tokenizer embedded in a GGUF file (tokenizer.ggml.model == 'gpt2').

        `reader`: an already opened `gguf_loader.open_gguf(path)`, to avoid parsing the file twice.
        """
        # Imported here so that text-only users do not pull in gguf-py through the package import.
        from ppow_jax.weights.gguf_loader import metadata, open_gguf

        reader = reader or open_gguf(path)
        model = metadata(reader, "tokenizer.ggml.model", None)
        if model != "gpt2":
            raise CheckpointError(f"{path}: tokenizer model {model!r} is not supported (only byte-level BPE, 'gpt2')")
        tokens: list[str] = metadata(reader, "tokenizer.ggml.tokens")
        merges: list[str] = metadata(reader, "tokenizer.ggml.merges")
        token_types: list[int] = metadata(reader, "tokenizer.ggml.token_type", [])
        pre = metadata(reader, "tokenizer.ggml.pre", "default")
        if pre not in _PRE_TOKENIZERS:
            logger.warning("%s: unknown pre-tokenizer %r; falling back to GPT-2 splitting", path, pre)
            pre = "gpt2"
        build_pre, nfc, ignore_merges = _PRE_TOKENIZERS[pre]

        vocab = {token: index for index, token in enumerate(tokens)}
        pairs = []
        for merge in merges:
            left, sep, right = merge.partition(" ")
            if not sep:
                raise CheckpointError(f"{path}: malformed BPE merge {merge!r}")
            pairs.append((left, right))
        backend = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=pairs, ignore_merges=ignore_merges))
        backend.pre_tokenizer = build_pre()
        if nfc:
            backend.normalizer = normalizers.NFC()
        backend.decoder = decoders.ByteLevel()
        # Control tokens (<|im_start|>...) and user-defined ones must match whole, never be split.
        special = [AddedToken(t, special=True, normalized=False)
                   for t, kind in zip(tokens, token_types) if kind == _CONTROL]
        user = [AddedToken(t, special=False, normalized=False)
                for t, kind in zip(tokens, token_types) if kind == _USER_DEFINED]
        backend.add_special_tokens(special)
        backend.add_tokens(user)

        def token_at(key: str) -> Optional[str]:
            index = metadata(reader, key, None)
            return tokens[int(index)] if index is not None and 0 <= int(index) < len(tokens) else None

        eos_ids = [int(metadata(reader, key)) for key in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id")
                   if metadata(reader, key, None) is not None]
        return cls(backend, bos_token=token_at("tokenizer.ggml.bos_token_id"), eos_token_ids=eos_ids,
                   pad_token=token_at("tokenizer.ggml.padding_token_id"),
                   chat_template=metadata(reader, "tokenizer.chat_template", None),
                   add_bos=bool(metadata(reader, "tokenizer.ggml.add_bos_token", False)))

    @classmethod
    def from_hf_directory(cls, path: Union[str, pathlib.Path]) -> "Tokenizer":
        """tokenizer.json + tokenizer_config.json (+ chat_template.jinja, generation_config.json)."""
        path = pathlib.Path(path)
        tokenizer_file = path / "tokenizer.json"
        if not tokenizer_file.is_file():
            raise CheckpointError(f"{path} has no tokenizer.json")
        try:
            backend = tokenizers.Tokenizer.from_file(str(tokenizer_file))
        except Exception as e:  # the Rust side reports parse errors as plain Exceptions
            raise CheckpointError(f"{tokenizer_file} could not be read: {e}") from e
        config = _read_json(path / "tokenizer_config.json")
        template = config.get("chat_template")
        if isinstance(template, list):  # named templates: use the default one
            template = next((t.get("template") for t in template if t.get("name") == "default"), None)
        if not template and (path / "chat_template.jinja").is_file():
            template = (path / "chat_template.jinja").read_text()

        bos = _token_text(config.get("bos_token"))
        bos_id = backend.token_to_id(bos) if bos else None
        if "add_bos_token" in config:
            add_bos = bool(config["add_bos_token"])
        else:
            # No flag: the tokenizer's post-processor decides, as it does for transformers.
            added = backend.encode("a", add_special_tokens=True).ids
            plain = backend.encode("a", add_special_tokens=False).ids
            add_bos = bos_id is not None and added[:1] == [bos_id] and plain[:1] != [bos_id]

        eos_ids: list[int] = []
        eos = _token_text(config.get("eos_token"))
        if eos and backend.token_to_id(eos) is not None:
            eos_ids.append(backend.token_to_id(eos))
        for name in ("generation_config.json", "config.json"):
            value = _read_json(path / name).get("eos_token_id")
            eos_ids.extend(value if isinstance(value, list) else [value] if isinstance(value, int) else [])
        return cls(backend, bos_token=bos, eos_token_ids=eos_ids, pad_token=_token_text(config.get("pad_token")),
                   chat_template=template or None, add_bos=add_bos)


def _read_json(path: pathlib.Path) -> dict:
    if not path.is_file():
        return {}
    try:
        value = json.loads(path.read_text())
    except ValueError as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}") from e
    return value if isinstance(value, dict) else {}
