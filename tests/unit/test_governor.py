"""The memory governor's arithmetic and its admission queue, without a server."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from appliance.config import LimitsConfig
from appliance.engine.admission import Admission
from appliance.engine.governor import KVShape, MemoryGovernor, kv_need
from appliance.engine.paths import kv_bytes_per_token, kv_shape
from appliance.errors import InsufficientMemory, InvalidRequest, QueueFull


def test_bytes_per_token_from_the_shape() -> None:
    demo = KVShape(layers=4, kv_heads=2, head_dim=32, dtype_bytes=4)
    assert demo.bytes_per_token() == 2 * 4 * 2 * 32 * 4 == 2048
    # A 1B shape in float16: 16 layers, 8 KV heads of 64 values.
    one_b = KVShape(16, 8, 64, 2)
    assert one_b.bytes_per_token() == 32768
    # Quantized: packed values plus a scale and a bias per group of 64, in float16.
    assert one_b.bytes_per_token(8) == 2 * 16 * 8 * (64 + 2 * 2)
    assert one_b.bytes_per_token(4) == 2 * 16 * 8 * (32 + 2 * 2)
    assert one_b.bytes_per_token(4) / one_b.bytes_per_token() == pytest.approx(0.28, abs=0.01)
    assert kv_need(2048, 100, 28) == 2048 * 128
    assert kv_need(2048, 0, -1) == 0


def test_the_shape_of_a_model_folder(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(
        '{"num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2,'
        ' "hidden_size": 128, "torch_dtype": "float32"}'
    )
    assert kv_shape(tmp_path) == KVShape(4, 2, 32, 4)
    assert kv_bytes_per_token(tmp_path) == 2048
    assert kv_shape(tmp_path / "missing") is None
    assert kv_bytes_per_token(tmp_path / "missing") == 0


def _governor(limit: int, weights: int) -> MemoryGovernor:
    return MemoryGovernor(limit, per_token=lambda _: 2048, weights=lambda: weights, workers=list)


def test_a_request_that_could_never_fit_names_the_field_to_lower() -> None:
    gov = _governor(limit=10_000_000, weights=4_000_000)  # about 2929 tokens of room
    gov.check_ever_fits("m", 100, 2800, prompt_param="messages")  # fits: no error
    with pytest.raises(InvalidRequest) as exc:
        gov.check_ever_fits("m", 100, 3000, prompt_param="messages")
    assert exc.value.param == "max_tokens" and exc.value.code == "insufficient_memory"
    assert "max_tokens may be at most 2829" in exc.value.message
    with pytest.raises(InvalidRequest) as exc:
        gov.check_ever_fits("m", 3000, 1, prompt_param="prompt")
    assert exc.value.param == "prompt" and "shorten the prompt" in exc.value.message


class Room:
    """Memory that the test frees by hand: `free` bytes, `asked` counts make_room calls."""

    def __init__(self, free: int) -> None:
        self.free = free
        self.asked = 0

    def fits(self, need: int) -> bool:
        return need <= self.free

    async def make_room(self, need: int) -> None:
        self.asked += 1


def test_the_first_in_line_waits_for_memory_and_nobody_passes_it() -> None:
    async def scenario() -> None:
        adm = Admission(LimitsConfig(max_running=4, max_queued=4, queue_timeout_s=2.0))
        adm.room = room = Room(free=100)
        assert await adm.acquire(need=60) == 0.0
        room.free -= 60
        assert adm.reserved == 60 and adm.would_wait(need=50)
        big = asyncio.ensure_future(adm.acquire(need=50))
        await asyncio.sleep(0.01)
        small = asyncio.ensure_future(adm.acquire(need=10))  # would fit, but waits its turn
        await asyncio.sleep(0.25)
        assert not big.done() and not small.done() and room.asked >= 1
        room.free += 60
        adm.release(60)
        await asyncio.wait_for(asyncio.gather(big, small), 1)
        assert adm.running == 2 and adm.reserved == 60

    asyncio.run(scenario())


def test_memory_waits_end_in_503_and_a_full_queue_in_429() -> None:
    async def scenario() -> None:
        adm = Admission(LimitsConfig(max_running=4, max_queued=1, queue_timeout_s=0.3))
        adm.room = Room(free=0)
        await adm.acquire()  # needs no KV bytes: not governed
        waiting = asyncio.ensure_future(adm.acquire(need=10))
        await asyncio.sleep(0.01)
        with pytest.raises(QueueFull):
            await adm.acquire(need=10)
        with pytest.raises(InsufficientMemory) as exc:
            await waiting
        assert exc.value.retry_after and adm.waiting == 0 and adm.running == 1

    asyncio.run(scenario())
