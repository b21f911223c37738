"""Loading a resolved model path into (model, tokenizer): an MLX or Hugging Face folder through
mlx-lm, a .gguf file through the GGUF importer (converted once into the model cache)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from ..errors import ModelLoadError
from .paths import is_gguf


def as_folder(path: Path, builtin_dir: Optional[str]) -> Path:
    """A folder mlx-lm loads: the path itself, or a GGUF file's converted folder."""
    if not is_gguf(path):
        return path
    from . import gguf

    return gguf.convert(path, gguf.default_cache_dir(builtin_dir))


def load_model(
    name: str, path: Path, *, builtin_dir: Optional[str], trust_remote_code: bool = False
) -> tuple[Any, Any]:
    """(model, tokenizer) of a resolved path, on the calling thread (the model's own)."""
    try:
        if is_gguf(path):
            from . import gguf

            return gguf.load(path, cache_dir=gguf.default_cache_dir(builtin_dir))
        from mlx_lm import load

        model, tokenizer = load(
            str(path), tokenizer_config={"trust_remote_code": trust_remote_code}
        )[:2]
        return model, tokenizer
    except ModelLoadError as exc:
        raise ModelLoadError(
            f"model {name!r} could not be loaded: {exc.message}", param=exc.param
        ) from None
    except Exception as exc:
        raise ModelLoadError(f"model {name!r} could not be loaded: {exc}") from None


def set_chat_template(tokenizer: Any, template: Optional[str], name: str) -> None:
    """Use `template` (a file path, or the Jinja text itself) instead of the model's own."""
    if not template:
        return
    path = Path(template).expanduser()
    text = template
    if "{" not in template:  # a path: a template always has Jinja tags
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise ModelLoadError(
                f"model {name!r}: chat_template file {template!r} can't be read: {exc}",
                param="chat_template",
            ) from None
    hf = getattr(tokenizer, "_tokenizer", tokenizer)
    hf.chat_template = text
