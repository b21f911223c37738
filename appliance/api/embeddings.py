"""POST /v1/embeddings (OpenAI) and POST /v1/rerank (Cohere / Jina style).

With a helper node configured (`helpers.embedding`, `helpers.rerank`) the request is proxied to
it; otherwise embeddings come from a catalog model on this appliance (mean-pooled final hidden
state, L2-normalised) and rerank orders documents by the cosine similarity of those embeddings,
so one appliance can be another's helper node.
"""

from __future__ import annotations

import base64
import struct
from dataclasses import dataclass
from typing import Any, Optional, Union

import falcon
import falcon.asgi
import orjson

from ..engine import embed as emb
from ..engine.service import Engine
from ..errors import HelperUnavailable, InvalidRequest
from ..helper_nodes import HelperNodes
from ..lifecycle import Lifecycle
from .generation import read_json

MAX_INPUTS = 2048
MAX_DOCUMENTS = 1000

EmbedInput = Union[str, tuple[int, ...]]


@dataclass(frozen=True)
class EmbeddingRequest:
    model: Optional[str]
    inputs: tuple[EmbedInput, ...]
    encoding_format: str  # float | base64
    dimensions: Optional[int]


@dataclass(frozen=True)
class RerankRequest:
    model: Optional[str]
    query: str
    documents: tuple[str, ...]
    top_n: Optional[int]
    return_documents: bool


def _model(body: dict[str, Any]) -> Optional[str]:
    model = body.get("model")
    if model is not None and (not isinstance(model, str) or not model or len(model) > 256):
        raise InvalidRequest("model must be a non-empty string", param="model")
    return model


def _token_list(v: Any) -> bool:
    return (
        isinstance(v, list)
        and bool(v)
        and all(isinstance(t, int) and not isinstance(t, bool) for t in v)
    )


def parse_embeddings(body: dict[str, Any]) -> EmbeddingRequest:
    """OpenAI's body: input is a string, a list of strings, a token list or a list of those."""
    raw = body.get("input")
    inputs: list[EmbedInput]
    if isinstance(raw, str):
        inputs = [raw]
    elif isinstance(raw, list) and _token_list(raw):
        inputs = [tuple(raw)]
    elif isinstance(raw, list) and raw:
        inputs = []
        for item in raw:
            if isinstance(item, str):
                inputs.append(item)
            elif _token_list(item):
                inputs.append(tuple(item))
            else:
                raise InvalidRequest(
                    "input must be a string, a list of strings or a list of token lists",
                    param="input",
                )
    else:
        raise InvalidRequest(
            "input must be a non-empty string or list (strings or token ids)", param="input"
        )
    if len(inputs) > MAX_INPUTS:
        raise InvalidRequest(f"input has {len(inputs)} items; at most {MAX_INPUTS}", param="input")
    fmt = body.get("encoding_format", "float")
    if fmt is None:
        fmt = "float"
    if fmt not in ("float", "base64"):
        raise InvalidRequest("encoding_format must be 'float' or 'base64'", param="encoding_format")
    dims = body.get("dimensions")
    if dims is not None and (isinstance(dims, bool) or not isinstance(dims, int) or dims < 1):
        raise InvalidRequest("dimensions must be a positive integer", param="dimensions")
    return EmbeddingRequest(_model(body), tuple(inputs), fmt, dims)


def parse_rerank(body: dict[str, Any]) -> RerankRequest:
    query = body.get("query")
    if not isinstance(query, str) or not query:
        raise InvalidRequest("query must be a non-empty string", param="query")
    docs_raw = body.get("documents")
    if not isinstance(docs_raw, list) or not docs_raw:
        raise InvalidRequest("documents must be a non-empty list", param="documents")
    if len(docs_raw) > MAX_DOCUMENTS:
        raise InvalidRequest(
            f"documents has {len(docs_raw)} items; at most {MAX_DOCUMENTS}", param="documents"
        )
    docs = []
    for d in docs_raw:
        if isinstance(d, dict) and isinstance(d.get("text"), str):
            d = d["text"]
        if not isinstance(d, str) or not d:
            raise InvalidRequest(
                'each document must be a non-empty string or {"text": ...}', param="documents"
            )
        docs.append(d)
    top_n = body.get("top_n")
    if top_n is not None and (isinstance(top_n, bool) or not isinstance(top_n, int) or top_n < 1):
        raise InvalidRequest("top_n must be a positive integer", param="top_n")
    ret = body.get("return_documents", True)
    if not isinstance(ret, bool):
        raise InvalidRequest("return_documents must be a boolean", param="return_documents")
    return RerankRequest(_model(body), query, tuple(docs), top_n, ret)


def _encode(vec: list[float], fmt: str) -> Union[list[float], str]:
    if fmt == "base64":  # little-endian float32, as OpenAI's clients decode it
        return base64.b64encode(struct.pack(f"<{len(vec)}f", *vec)).decode()
    return vec


def _truncate(vec: list[float], dims: Optional[int]) -> list[float]:
    if dims is None or dims >= len(vec):
        return vec
    cut = vec[:dims]
    norm = sum(x * x for x in cut) ** 0.5 or 1.0
    return [x / norm for x in cut]


def _relay(resp: falcon.asgi.Response, answer: Any) -> None:
    resp.status = answer.status
    resp.content_type = answer.content_type
    resp.data = answer.body


def _vectors_from(answer: Any) -> list[list[float]]:
    """The vectors of an OpenAI embeddings answer (float format)."""
    try:
        data = orjson.loads(answer.body)["data"]
        return [list(map(float, d["embedding"])) for d in sorted(data, key=lambda d: d["index"])]
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
        raise HelperUnavailable(
            "the embedding helper answered something that is not an embeddings list"
        ) from None


class _Base:
    def __init__(
        self, engine: Engine, lifecycle: Lifecycle, helpers: HelperNodes, max_body_bytes: int
    ) -> None:
        self.engine = engine
        self.lifecycle = lifecycle
        self.helpers = helpers
        self.max_body_bytes = max_body_bytes

    async def relayed(
        self,
        req: falcon.asgi.Request,
        resp: falcon.asgi.Response,
        role: str,
        path: str,
        model: Optional[str],
        body: dict[str, Any],
    ) -> bool:
        """Pass the request to the helper node of `role` when one is set; True if it did."""
        helper = self.helpers.get(role)
        if helper is None:
            return False
        req.context.model = model or ""
        _relay(resp, await helper.post(path, body))
        return True

    async def vectors(
        self, req: falcon.asgi.Request, model: Optional[str], inputs: tuple[EmbedInput, ...]
    ) -> tuple[list[list[float]], int, str]:
        """Vectors from the embedding helper when one is set, else from a local model."""
        helper = self.helpers.get("embedding")
        if helper is not None:
            body: dict[str, Any] = {
                "input": [i if isinstance(i, str) else list(i) for i in inputs],
                "encoding_format": "float",
            }
            if model:
                body["model"] = model
            answer = await helper.post("/v1/embeddings", body)
            if answer.status != 200:
                raise HelperUnavailable(f"the embedding helper answered {answer.status}")
            usage = orjson.loads(answer.body).get("usage") or {}
            return _vectors_from(answer), int(usage.get("prompt_tokens", 0)), model or ""
        name = self.engine.resolve_name(model)
        req.context.model = name
        vecs, tokens = await emb.embed(self.engine, name, inputs)
        return vecs, tokens, name


class Embeddings(_Base):
    """POST /v1/embeddings."""

    async def on_post(self, req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        self.lifecycle.check()
        body = await read_json(req, self.max_body_bytes)
        parsed = parse_embeddings(body)
        if await self.relayed(req, resp, "embedding", "/v1/embeddings", parsed.model, body):
            return
        vecs, tokens, name = await self.vectors(req, parsed.model, parsed.inputs)
        data = [
            {
                "object": "embedding",
                "index": i,
                "embedding": _encode(_truncate(v, parsed.dimensions), parsed.encoding_format),
            }
            for i, v in enumerate(vecs)
        ]
        resp.content_type = falcon.MEDIA_JSON
        resp.data = orjson.dumps(
            {
                "object": "list",
                "data": data,
                "model": name,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
            }
        )


class Rerank(_Base):
    """POST /v1/rerank: {model, query, documents, top_n, return_documents} -> results by score."""

    async def on_post(self, req: falcon.asgi.Request, resp: falcon.asgi.Response) -> None:
        self.lifecycle.check()
        body = await read_json(req, self.max_body_bytes)
        parsed = parse_rerank(body)
        if await self.relayed(req, resp, "rerank", "/v1/rerank", parsed.model, body):
            return
        vecs, tokens, name = await self.vectors(
            req, parsed.model, (parsed.query, *parsed.documents)
        )
        q, docs = vecs[0], vecs[1:]
        scored = sorted(
            ((i, emb.cosine(q, d)) for i, d in enumerate(docs)), key=lambda t: (-t[1], t[0])
        )
        if parsed.top_n is not None:
            scored = scored[: parsed.top_n]
        results = []
        for i, score in scored:
            item: dict[str, Any] = {"index": i, "relevance_score": score}
            if parsed.return_documents:
                item["document"] = {"text": parsed.documents[i]}
            results.append(item)
        resp.content_type = falcon.MEDIA_JSON
        resp.data = orjson.dumps(
            {
                "object": "list",
                "model": name,
                "results": results,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
            }
        )
