"""The tokenizer a GGUF file describes, rebuilt with the `tokenizers` library.

Byte-level BPE (`tokenizer.ggml.model == "gpt2"`: Llama 3, Qwen, SmolLM, ...): the vocabulary
and merges from the file, the pre-tokenizer chosen by `tokenizer.ggml.pre` the way llama.cpp
chooses its split expressions. SentencePiece BPE (`"llama"`: Llama 2, Mistral, TinyLlama):
pieces, scores and byte-fallback tokens. Both: control tokens as special tokens,
BOS/EOS/UNK/PAD and the chat template from the metadata.
"""

from __future__ import annotations

from typing import Any, Optional

from ...errors import ModelLoadError

# Split expressions as in the models' own tokenizer.json files (llama.cpp spells the same
# expressions without `(?i:...)`). Each runs on the pieces the one before left.
_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_TEKKEN = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_GPT4O = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# tokenizer.ggml.pre -> split expressions, in llama.cpp's grouping.
PRE_TOKENIZERS: dict[str, tuple[str, ...]] = {
    **dict.fromkeys(("gpt2", "mpt", "olmo", "jais", "trillion"), (_GPT2,)),
    **dict.fromkeys(
        ("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva"),
        (r"\p{N}", _GPT2),
    ),
    **dict.fromkeys(
        ("llama3", "llama-v3", "llama-bpe", "dbrx", "smaug-bpe", "falcon3", "chatglm-bpe"),
        (_LLAMA3,),
    ),
    **dict.fromkeys(
        ("qwen2", "stablelm2", "deepseek-r1-qwen", "megrez", "hunyuan", "grok-2"), (_QWEN2,)
    ),
    "tekken": (_TEKKEN,),
    **dict.fromkeys(("gpt-4o", "llama4", "minimax-m2"), (_GPT4O,)),
    # llama.cpp's fallback for files written before tokenizer.ggml.pre existed
    "default": (r"[\p{P}\$\+<=>\^~\|]+", _GPT2, r"\p{N}+", r"[0-9][0-9][0-9]"),
}
# Pre-tokenizers for which llama.cpp takes a word found whole in the vocabulary as it is.
_IGNORE_MERGES = {"llama3", "llama-v3", "llama-bpe", "dbrx", "smaug-bpe", "falcon3"}

NORMAL, CONTROL, USER_DEFINED = 1, 3, 4  # tokenizer.ggml.token_type values
SPACE = "\u2581"  # SentencePiece's visible space


def _as_list(value: Any) -> list[Any]:
    return [v.item() if hasattr(v, "item") else v for v in value]


def build_tokenizer(metadata: dict[str, Any], source: str) -> Any:
    """A transformers PreTrainedTokenizerFast for the file's vocabulary (not yet wrapped)."""
    from tokenizers import AddedToken, Tokenizer, processors
    from transformers import PreTrainedTokenizerFast

    kind = metadata.get("tokenizer.ggml.model")
    tokens: list[str] = list(metadata.get("tokenizer.ggml.tokens") or [])
    if not tokens:
        raise ModelLoadError(f"{source}: the file carries no vocabulary (tokenizer.ggml.tokens)")
    types = _as_list(metadata.get("tokenizer.ggml.token_type", [1] * len(tokens)))
    if kind == "gpt2":
        tok, vocab, spelled = _byte_level(metadata, tokens, source)
        add_bos_default = False
    elif kind == "llama":
        tok, vocab = _sentencepiece(metadata, tokens, types)
        spelled = None
        add_bos_default = True  # llama.cpp's default for SentencePiece vocabularies
    else:
        raise ModelLoadError(
            f"{source}: tokenizer model {kind!r} is not supported; byte-level BPE ('gpt2': "
            "Llama 3, Qwen, SmolLM) and SentencePiece BPE ('llama': Llama 2, Mistral) are"
        )

    special = [
        AddedToken(t, special=True, normalized=False)
        for t, kind_ in zip(tokens, types, strict=False)
        if kind_ == CONTROL and (spelled is None or set(t) <= spelled)
    ]
    tok.add_special_tokens(special)
    user = [
        AddedToken(t, special=False, normalized=False)
        for t, kind_ in zip(tokens, types, strict=False)
        if kind_ == USER_DEFINED and t in vocab
    ]
    if user:
        tok.add_tokens(user)

    def token_of(key: str) -> Optional[str]:
        index = metadata.get(f"tokenizer.ggml.{key}")
        return tokens[int(index)] if index is not None and 0 <= int(index) < len(tokens) else None

    bos, eos = token_of("bos_token_id"), token_of("eos_token_id")
    add_bos = bool(metadata.get("tokenizer.ggml.add_bos_token", add_bos_default))
    add_eos = bool(metadata.get("tokenizer.ggml.add_eos_token", False))
    if (add_bos and bos) or (add_eos and eos):
        first = [bos] if add_bos and bos else []
        last = [eos] if add_eos and eos else []
        single = " ".join([*first, "$A", *last])
        pair = " ".join([*first, "$A", *last, *first, "$B:1", *last])
        ids = {t: vocab[t] for t in {*first, *last}}
        tok.post_processor = processors.TemplateProcessing(
            single=single, pair=pair, special_tokens=list(ids.items())
        )
    elif kind == "gpt2":
        tok.post_processor = processors.ByteLevel(trim_offsets=False)

    kwargs: dict[str, Any] = {
        "bos_token": bos,
        "eos_token": eos,
        "unk_token": token_of("unknown_token_id"),
        "pad_token": token_of("padding_token_id"),
        "clean_up_tokenization_spaces": False,
    }
    template = metadata.get("tokenizer.chat_template")
    if template:
        kwargs["chat_template"] = str(template)
    context = metadata.get(f"{metadata.get('general.architecture')}.context_length")
    if context:
        kwargs["model_max_length"] = int(context)
    assert isinstance(tok, Tokenizer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, **{k: v for k, v in kwargs.items() if v is not None}
    )


def _byte_level(
    metadata: dict[str, Any], tokens: list[str], source: str
) -> tuple[Any, dict[str, int], set[str]]:
    """Byte-level BPE: the file's vocabulary and merges, split the way `pre` names."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    pre = str(metadata.get("tokenizer.ggml.pre", "default"))
    if pre not in PRE_TOKENIZERS:
        raise ModelLoadError(f"{source}: pre-tokenizer {pre!r} is not supported")
    merges_raw = metadata.get("tokenizer.ggml.merges")
    if merges_raw is None:
        raise ModelLoadError(f"{source}: byte-level BPE vocabulary without merges")
    alphabet = _byte_alphabet()
    spelled = set(alphabet.values())
    vocab: dict[str, int] = {}
    for index, token in enumerate(tokens):
        # Some converters store added tokens as plain text rather than in the byte alphabet.
        if not set(token) <= spelled:
            token = "".join(alphabet[b] for b in token.encode("utf-8"))
        vocab.setdefault(token, index)
    merges = [tuple(m.split(" ", 1)) for m in merges_raw]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=pre in _IGNORE_MERGES))
    splits = [
        pre_tokenizers.Split(Regex(expr), behavior="isolated") for expr in PRE_TOKENIZERS[pre]
    ]
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [*splits, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )
    tok.decoder = decoders.ByteLevel()
    return tok, vocab, spelled


def _sentencepiece(
    metadata: dict[str, Any], tokens: list[str], types: list[int]
) -> tuple[Any, dict[str, int]]:
    """SentencePiece BPE as llama.cpp runs it: spaces become '▁' (one prefixed to the text and
    after each special token), adjacent pieces merge best score first, and what no piece
    covers falls back to <0xXX> byte tokens."""
    from tokenizers import Tokenizer, decoders, models, normalizers

    scores = _as_list(metadata.get("tokenizer.ggml.scores", [0.0] * len(tokens)))
    vocab: dict[str, int] = {}
    for index, token in enumerate(tokens):
        vocab.setdefault(token, index)
    # Merging the pair whose result scores best is BPE with merges ranked by that score.
    merges: list[tuple[str, str, float]] = []
    for token, kind, score in zip(tokens, types, scores, strict=False):
        if kind != NORMAL:
            continue
        for i in range(1, len(token)):
            left, right = token[:i], token[i:]
            if left in vocab and right in vocab:
                merges.append((left, right, float(score)))
    merges.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    unk_id = metadata.get("tokenizer.ggml.unknown_token_id")
    unk = tokens[int(unk_id)] if unk_id is not None else None
    tok = Tokenizer(
        models.BPE(
            vocab=vocab,
            merges=[(a, b) for a, b, _ in merges],
            unk_token=unk,
            fuse_unk=True,
            byte_fallback=True,
        )
    )
    prefix = bool(metadata.get("tokenizer.ggml.add_space_prefix", True))
    steps = [normalizers.Replace(" ", SPACE)]
    tok.normalizer = normalizers.Sequence([normalizers.Prepend(SPACE), *steps] if prefix else steps)
    parts = [decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    if prefix:
        parts.append(decoders.Strip(" ", 1, 0))
    tok.decoder = decoders.Sequence(parts)
    return tok, vocab


def _byte_alphabet() -> dict[int, str]:
    """GPT-2's byte -> printable character table."""
    bs = list(range(ord("!"), ord("~") + 1))
    bs += list(range(ord("\xa1"), ord("\xac") + 1)) + list(range(ord("\xae"), ord("\xff") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs), strict=False))
