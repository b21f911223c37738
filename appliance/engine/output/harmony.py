"""gpt-oss output through the harmony format (the `openai-harmony` package), on token ids.

Harmony's structure lives in special tokens (`<|channel|>`, `<|message|>`, `<|end|>`,
`<|call|>`), so this parser reads the generated token ids, not the detokenized text: the
caller passes them as `OutputParser.feed(text, tokens)`. Each message's channel decides:

- `analysis` -> `Reasoning`;
- `final`, and `commentary` without a recipient (a preamble) -> `Text`;
- a message with a recipient (`to=functions.NAME`, in the role or the channel header) -> a tool
  call named NAME (the `functions.` prefix dropped; other recipients keep their full name).
  Its content is the arguments JSON, streamed as it comes and completed like any other cut
  call if it ends early (a `<|call|>` stop token the engine does not pass on is not needed).

Tokens the harmony parser rejects end the structure: from there on, the output is text.

Harmony's encoding needs the o200k vocabulary file (`o200k_base.tiktoken`), which the package
downloads on first use. An appliance is often offline, and a gpt-oss checkpoint carries the same
vocabulary in its tokenizer, so `load_encoding(tokenizer)` writes that file from the model's
own tokenizer into the appliance's cache (checked against the published digest) and points
`TIKTOKEN_ENCODINGS_BASE` at it when that variable is not already set.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import os
import threading
from pathlib import Path
from typing import Any, Optional, Sequence

from ...errors import ModelLoadError
from .events import (
    Event,
    IdFactory,
    Reasoning,
    Text,
    ToolCallArgs,
    ToolCallEnd,
    ToolCallStart,
    merge,
)
from .jsonscan import DONE, ERR, JsonScan

__all__ = ["O200K_FILE", "O200K_SHA256", "HarmonyOutput", "load_encoding", "write_vocab_file"]

O200K_FILE = "o200k_base.tiktoken"
O200K_SHA256 = "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d"
O200K_SIZE = 199998  # ordinary tokens; harmony's special tokens follow
_ENV = "TIKTOKEN_ENCODINGS_BASE"
_lock = threading.Lock()


def _cache_dir() -> Path:
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("appliance")) / "tiktoken"


def _byte_decoder() -> dict[str, int]:
    # GPT-2's byte-to-unicode table, inverted: byte-level BPE vocabularies spell bytes this way.
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs, strict=True)}


def write_vocab_file(tokenizer: Any, folder: Path) -> Path:
    """Writes `o200k_base.tiktoken` from a gpt-oss tokenizer's vocabulary into `folder`.
    Raises ModelLoadError when the vocabulary is not o200k (its digest differs)."""
    vocab = tokenizer.get_vocab()
    dec = _byte_decoder()
    ranks: list[Optional[str]] = [None] * O200K_SIZE
    for tok, rank in vocab.items():
        if 0 <= rank < O200K_SIZE:
            try:
                raw = bytes(dec[c] for c in tok)
            except KeyError:
                raise ModelLoadError(
                    "the tokenizer is not byte-level BPE: it cannot give harmony its vocabulary"
                ) from None
            ranks[rank] = base64.b64encode(raw).decode("ascii")
    if any(r is None for r in ranks):
        raise ModelLoadError("the tokenizer lacks o200k tokens: it is not a gpt-oss tokenizer")
    text = "".join(f"{r} {i}\n" for i, r in enumerate(ranks))
    data = text.encode("ascii")
    if hashlib.sha256(data).hexdigest() != O200K_SHA256:
        raise ModelLoadError("the tokenizer's vocabulary is not o200k: harmony cannot use it")
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / O200K_FILE
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_bytes(data)
    tmp.replace(path)
    return path


def load_encoding(tokenizer: Any = None, *, cache_dir: Optional[Path] = None) -> Any:
    """Harmony's gpt-oss encoding, loaded once per process.

    With `TIKTOKEN_ENCODINGS_BASE` unset, the vocabulary file is looked for in the appliance's
    cache (`cache_dir`), written there from `tokenizer` when missing, and the variable is
    pointed at it. Raises ModelLoadError when no vocabulary can be had."""
    with _lock:
        if not os.environ.get(_ENV):
            folder = cache_dir or _cache_dir()
            if not (folder / O200K_FILE).exists():
                if tokenizer is None:
                    raise ModelLoadError(
                        f"harmony needs {O200K_FILE}: load the gpt-oss model (its tokenizer "
                        f"provides it) or set {_ENV} to a folder holding it"
                    )
                write_vocab_file(tokenizer, folder)
            os.environ[_ENV] = str(folder)
        return _load(os.environ[_ENV])


@functools.lru_cache(maxsize=4)
def _load(base: str) -> Any:
    try:
        from openai_harmony import HarmonyEncodingName, load_harmony_encoding
    except ImportError as exc:
        raise ModelLoadError("gpt-oss needs the openai-harmony package") from exc
    try:
        return load_harmony_encoding(HarmonyEncodingName.HARMONY_GPT_OSS)
    except Exception as exc:  # HarmonyError: missing or corrupt vocabulary file
        raise ModelLoadError(f"harmony could not load its vocabulary from {base}: {exc}") from exc


class HarmonyOutput:
    """Harmony messages to events (see the module docstring); one per answer."""

    def __init__(self, *, tools_enabled: bool, id_factory: IdFactory, encoding: Any = None) -> None:
        from openai_harmony import Role, StreamableParser

        self.enc = encoding if encoding is not None else load_encoding()
        self.sp = StreamableParser(self.enc, role=Role.ASSISTANT)
        self.tools = tools_enabled
        self.new_id = id_factory
        self.calls = 0
        self.index: Optional[int] = None
        self.scan: Optional[JsonScan] = None
        self.args: list[str] = []
        self.call_broken = False
        self.done_messages = 0
        self.header: list[int] = []  # tokens since the last message boundary, before content
        self.broken: Optional[list[int]] = None  # tokens after the structure broke
        self.broken_sent = 0
        self.out: list[Event] = []

    def feed_tokens(self, tokens: Sequence[int]) -> list[Event]:
        from openai_harmony import StreamState

        for t in tokens:
            if self.broken is not None:
                self.broken.append(int(t))
                continue
            try:
                self.sp.process(int(t))
            except Exception:  # HarmonyError: not harmony any more; the rest is text
                self._break([int(t)])
                continue
            n = len(self.sp.messages)
            if n > self.done_messages:
                self.done_messages = n
                self._message_over()
                self.header = []
                continue
            if self.sp.state == StreamState.HEADER:
                self.header.append(int(t))
                continue
            self.header = []
            delta = self.sp.last_content_delta
            if delta:
                self._content(self.sp.current_channel, self.sp.current_recipient, delta)
        if self.broken is not None:
            self._flush_broken()
        return self._take()

    def close(self) -> list[Event]:
        if self.broken is None:
            try:
                self.sp.process_eos()
            except Exception:  # a cut mid-header: nothing more to learn from harmony
                pass
            if self.index is not None:
                self._end_call()
            elif self.header and not any(self.enc.is_special_token(t) for t in self.header):
                # Plain text without any harmony header: it is the answer.
                self._emit(Text(_decode(self.enc, self.header, True)))
        else:
            self._flush_broken(final=True)
        return self._take()

    def _take(self) -> list[Event]:

        out, self.out = self.out, []
        return merge(out)

    def _emit(self, ev: Event) -> None:
        self.out.append(ev)

    def _content(self, channel: Optional[str], recipient: Optional[str], delta: str) -> None:
        if recipient and self.tools:
            if self.index is None and not self.call_broken:
                name = recipient.removeprefix("functions.")
                self.index = self.calls
                self.args = []
                self.scan = JsonScan(top="{")
                self._emit(ToolCallStart(self.index, self.new_id(), name))
            if self.call_broken:
                self._emit(Text(delta))
                return
            assert self.scan is not None
            for i, ch in enumerate(delta):
                r = self.scan.push(ch)
                if r == ERR:
                    # Not JSON any more: the call ends here, the rest of its content is text.
                    self._end_call()
                    self.call_broken = True
                    self._emit(Text(delta[i:]))
                    return
                if r == DONE:
                    break
            self._args(self.scan.take())
        elif channel == "analysis":
            self._emit(Reasoning(delta))
        else:
            self._emit(Text(delta))

    def _args(self, delta: str) -> None:
        if delta and self.index is not None:
            self.args.append(delta)
            self._emit(ToolCallArgs(self.index, delta))

    def _end_call(self) -> None:
        assert self.index is not None and self.scan is not None
        self.scan.finish()
        self._args(self.scan.take_closed())
        if not self.args:
            self._args("{}")
        self._emit(ToolCallEnd(self.index, "".join(self.args)))
        self.index = None
        self.scan = None
        self.calls += 1

    def _message_over(self) -> None:
        if self.index is not None:
            self._end_call()
        self.call_broken = False

    def _break(self, tokens: list[int]) -> None:
        if self.index is not None:
            self._end_call()
        # The header read so far was not harmony either: it is text too.
        self.broken = [t for t in self.header if not self.enc.is_special_token(t)] + tokens
        self.header = []

    def _flush_broken(self, final: bool = False) -> None:
        assert self.broken is not None
        text = _decode(self.enc, self.broken, final)
        if len(text) > self.broken_sent:
            self._emit(Text(text[self.broken_sent :]))
            self.broken_sent = len(text)


def _decode(enc: Any, tokens: list[int], final: bool) -> str:
    # Decoding may end inside a multi-byte character: hold it back until the end.
    try:
        return str(enc.decode_utf8(tokens))
    except Exception:
        text = str(enc.decode(tokens))
        return text if final or not text.endswith("\ufffd") else text[:-1]
