"""Loading a resolved model path into (model, tokenizer): an MLX or Hugging Face folder through
mlx-lm, a .gguf file through the GGUF importer (converted once into the model cache); then, on
the CPU backend, the weights as the model's plan says (float32, quantized layers dense or not)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Optional

from ..errors import ModelLoadError
from .cpu import WeightPlan, plan_weights, to_cpu_compute
from .paths import is_gguf, weight_sizes

log = logging.getLogger("appliance.engine")


def as_folder(path: Path, builtin_dir: Optional[str]) -> Path:
    """A folder mlx-lm loads: the path itself, or a GGUF file's converted folder."""
    if not is_gguf(path):
        return path
    from . import gguf

    return gguf.convert(path, gguf.default_cache_dir(builtin_dir))


def weight_plan(path: Path, cpu_weights: str) -> tuple[WeightPlan, int]:
    """How the model at `path` will hold its weights here, and their bytes so held."""
    sizes = weight_sizes(path)
    plan = plan_weights(cpu_weights, sizes)
    return plan, plan.bytes(sizes)


def load_model(
    name: str,
    path: Path,
    *,
    builtin_dir: Optional[str],
    trust_remote_code: bool = False,
    plan: Optional[WeightPlan] = None,
) -> tuple[Any, Any]:
    """(model, tokenizer) of a resolved path, on the calling thread (the model's own), with
    `plan` applied (None: planned here with cpu_weights=auto)."""
    try:
        if plan is None:
            plan = weight_plan(path, "auto")[0]
        if is_gguf(path):
            from . import gguf

            model, tokenizer = gguf.load(path, cache_dir=gguf.default_cache_dir(builtin_dir))
        else:
            from mlx_lm import load

            model, tokenizer = load(
                str(path), tokenizer_config={"trust_remote_code": trust_remote_code}
            )[:2]
        model = to_cpu_compute(model, plan)
        log.info("model %s weights: %s", name, plan.summary())
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
