"""The embedded demo model: built deterministically, loaded and run by the real mlx_lm."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from appliance.engine.demo import MARKER, SHAPES, demo_dir, ensure_demo_model

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return ensure_demo_model(tmp_path_factory.mktemp("demo"))


@pytest.fixture(scope="module")
def loaded(built: Path):
    import mlx_lm

    return mlx_lm.load(str(built))


@pytest.mark.timeout(120)
def test_layout_and_config(built: Path, tmp_path: Path) -> None:
    assert built == demo_dir(built.parent)
    for name in (
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
        "special_tokens_map.json",
        MARKER,
    ):
        assert (built / name).is_file(), name
    cfg = json.loads((built / "config.json").read_text())
    assert cfg["model_type"] == "llama"
    assert cfg["num_attention_heads"] == 4
    assert cfg["num_key_value_heads"] == 2
    assert cfg["hidden_size"] == SHAPES["demo"]["hidden_size"]
    assert cfg["vocab_size"] == 1024
    assert cfg["tie_word_embeddings"] is False
    tok = json.loads((built / "tokenizer.json").read_text())
    ids = {t["content"]: t["id"] for t in tok["added_tokens"]}
    assert cfg["bos_token_id"] == ids["<|begin_of_text|>"]
    assert cfg["eos_token_id"] == [ids["<|eot_id|>"], ids["<|end_of_text|>"]]
    tcfg = json.loads((built / "tokenizer_config.json").read_text())
    assert tcfg["eos_token"] == "<|eot_id|>"
    assert "chat_template" in tcfg
    # Nothing left behind by the build but the model folder and its lock.
    leftovers = [p.name for p in built.parent.iterdir() if p.name.startswith(f".{built.name}.tmp")]
    assert leftovers == []


@pytest.mark.timeout(120)
def test_weight_names(built: Path) -> None:
    from safetensors import safe_open

    with safe_open(str(built / "model.safetensors"), framework="numpy") as f:
        names = set(f.keys())
        assert f.get_tensor("model.norm.weight").dtype.name == "float32"
    assert "model.embed_tokens.weight" in names
    assert "lm_head.weight" in names
    assert "model.layers.3.self_attn.k_proj.weight" in names
    assert "model.layers.0.mlp.down_proj.weight" in names
    assert "model.layers.0.post_attention_layernorm.weight" in names
    assert len(names) == 2 + 1 + 4 * 9


@pytest.mark.timeout(120)
def test_builds_are_byte_identical(built: Path, tmp_path: Path) -> None:
    other = ensure_demo_model(tmp_path / "again")
    assert other != built
    for name in ("model.safetensors", "tokenizer.json", "config.json", "tokenizer_config.json"):
        assert (other / name).read_bytes() == (built / name).read_bytes(), name


@pytest.mark.timeout(120)
def test_second_call_does_not_rebuild(tmp_path: Path) -> None:
    lines: list[str] = []
    path = ensure_demo_model(tmp_path, progress=lines.append)
    assert any("building" in line for line in lines)
    assert any(line.startswith("done in") for line in lines)
    before = {p.name: p.stat().st_mtime_ns for p in path.iterdir()}
    lines.clear()
    time.sleep(0.05)
    assert ensure_demo_model(tmp_path, progress=lines.append) == path
    assert lines == []
    assert {p.name: p.stat().st_mtime_ns for p in path.iterdir()} == before


@pytest.mark.timeout(120)
def test_incomplete_folder_is_rebuilt(tmp_path: Path) -> None:
    target = demo_dir(tmp_path)
    target.mkdir(parents=True)
    (target / "config.json").write_text("{}")  # a build killed before its marker was written
    path = ensure_demo_model(tmp_path, progress=lambda _: None)
    assert (path / MARKER).is_file()
    assert json.loads((path / "config.json").read_text())["model_type"] == "llama"


@pytest.mark.timeout(120)
def test_concurrent_builders(tmp_path: Path) -> None:
    # Two real processes race to build the same folder; both must get the complete model.
    cmd = [sys.executable, "-m", "appliance.engine.demo", "--dir", str(tmp_path)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = [
        subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=100)[0].strip() for p in procs]
    assert [p.returncode for p in procs] == [0, 0]
    assert outs[0] == outs[1] == str(demo_dir(tmp_path))
    assert (Path(outs[0]) / MARKER).is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [demo_dir(tmp_path).name, f".{demo_dir(tmp_path).name}.lock"]
    )


@pytest.mark.timeout(120)
def test_loads_fast_with_mlx_lm(built: Path) -> None:
    import mlx_lm

    t0 = time.monotonic()
    model, tokenizer = mlx_lm.load(str(built))
    assert time.monotonic() - t0 < 5.0  # about 0.03 s here; generous for slow CI
    assert len(model.layers) == 4


@pytest.mark.timeout(120)
def test_chat_template(loaded) -> None:
    _, tokenizer = loaded
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False
    )
    assert text == (
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], add_generation_prompt=True
    )
    assert ids[0] == tokenizer.bos_token_id
    assert tokenizer.decode(ids) == text
    assert tokenizer.eos_token_ids == {1, 4}


@pytest.mark.timeout(120)
def test_every_byte_round_trips(loaded) -> None:
    _, tokenizer = loaded
    s = "Ünïcödé 日本語 🎉\ttabs\r\n and\x00bytes"
    assert tokenizer.decode(tokenizer.encode(s, add_special_tokens=False)) == s


@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    "prompt", ["hi", "The weather today", "Tell me about trains.", "Once upon a time"]
)
def test_greedy_generation_is_varied_and_deterministic(loaded, prompt: str) -> None:
    import mlx_lm

    model, tokenizer = loaded
    chat = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], add_generation_prompt=True
    )
    steps = list(mlx_lm.stream_generate(model, tokenizer, chat, max_tokens=40))
    tokens = [s.token for s in steps]
    assert len(tokens) == 40 and steps[-1].finish_reason == "length"
    assert len(set(tokens)) >= 5, tokens
    text = mlx_lm.generate(model, tokenizer, chat, max_tokens=40)
    assert text.strip()
    assert text == "".join(s.text for s in steps)
    # Unprintable byte tokens are damped at the output, so the text is clean.
    assert all(c.isprintable() or c == "\n" for c in text), repr(text)


@pytest.mark.timeout(120)
def test_raw_prompt_generation(loaded) -> None:
    import mlx_lm

    model, tokenizer = loaded
    assert mlx_lm.generate(model, tokenizer, "The weather", max_tokens=20).strip()


def test_demo_dir_honours_xdg_cache_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    if sys.platform != "linux":
        pytest.skip("XDG_CACHE_HOME is a Linux convention")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert demo_dir() == tmp_path / "xdg" / "appliance" / "models" / "demo-demo-v1"
    assert demo_dir(shape="llama-1b").name == "demo-llama-1b-v1"
    assert demo_dir("~/m") == Path.home() / "m" / "demo-demo-v1"
    with pytest.raises(ValueError):
        demo_dir(shape="nope")
