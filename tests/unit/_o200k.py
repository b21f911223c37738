"""The o200k vocabulary for the harmony tests, without a download from a model hub.

gpt-oss's harmony encoding needs `o200k_base.tiktoken`. The npm package js-tiktoken ships the
same ranks (MIT); they are taken from it once with the ordinary npm client, checked against the
published digest, and kept in the user cache. Without npm or the registry the tests skip.
"""

from __future__ import annotations

import base64
import hashlib
import json
import shutil
import subprocess
import tarfile
import tempfile
from pathlib import Path
from typing import Any, Optional

from appliance.engine.output.harmony import O200K_FILE, O200K_SHA256

JS_TIKTOKEN = "js-tiktoken@1.0.21"


def _folder() -> Path:
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("appliance")) / "test-o200k"


def ranks_file() -> Optional[Path]:
    """The o200k vocabulary file, fetched and converted on first use; None if it can't be."""
    path = _folder() / O200K_FILE
    if path.exists():
        return path
    npm = shutil.which("npm")
    if npm is None:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        try:
            subprocess.run(
                [npm, "pack", JS_TIKTOKEN, "--silent"],
                cwd=tmp,
                check=True,
                capture_output=True,
                timeout=180,
            )
        except (subprocess.SubprocessError, OSError):
            return None
        tgz = next(Path(tmp).glob("js-tiktoken-*.tgz"), None)
        if tgz is None:
            return None
        with tarfile.open(tgz) as tar:
            member = tar.extractfile("package/dist/ranks/o200k_base.js")
            assert member is not None
            src = member.read().decode()
    doc = json.loads(src[src.index("{") :].rstrip().rstrip(";"))
    ranks: dict[int, str] = {}
    for line in doc["bpe_ranks"].split("\n"):
        if line:
            _, offset, *tokens = line.split(" ")
            for i, tok in enumerate(tokens):
                ranks[int(offset) + i] = tok
    data = "".join(f"{ranks[r]} {r}\n" for r in sorted(ranks)).encode()
    if hashlib.sha256(data).hexdigest() != O200K_SHA256:
        return None
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def gpt_oss_like_tokenizer(path: Path) -> Any:
    """A transformers tokenizer whose vocabulary is o200k's, in byte-level BPE spelling, with
    harmony's special tokens: what a gpt-oss checkpoint's tokenizer gives the vocabulary from
    (merges are not needed for that)."""
    from tokenizers import AddedToken, Tokenizer
    from tokenizers.models import BPE
    from transformers import PreTrainedTokenizerFast

    bs = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    enc = {b: chr(c) for b, c in zip(bs, cs, strict=True)}
    vocab = {}
    for line in path.read_text().splitlines():
        tok, rank = line.split(" ")
        vocab["".join(enc[b] for b in base64.b64decode(tok))] = int(rank)
    tk = Tokenizer(BPE(vocab=vocab, merges=[]))
    tk.add_special_tokens(
        [
            AddedToken(t, special=True)
            for t in (
                "<|startoftext|>",
                "<|endoftext|>",
                "<|return|>",
                "<|constrain|>",
                "<|channel|>",
                "<|start|>",
                "<|end|>",
                "<|message|>",
                "<|call|>",
            )
        ]
    )
    return PreTrainedTokenizerFast(tokenizer_object=tk)
