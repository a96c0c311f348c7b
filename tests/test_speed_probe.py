"""The speed probe runs all of its sequences at once, whatever the model's K/V size."""

from __future__ import annotations

from testbed.engine.speed_probe import SpeedProbe
from tests.engine_helpers import tiny_checkpoint


def test_the_probe_cache_holds_every_sequence_so_it_never_waits_or_preempts(tmp_path):
    # 200 sequences of 54 tokens overflow the 8 MB floor for this model: the cache must grow
    probe = SpeedProbe(tiny_checkpoint(tmp_path / "m"), num_prompts=200, prompt_tokens=48,
                       new_tokens=6, device="cpu")  # fmt: skip
    blocks = probe.engine.block_manager
    need = sum(-(-(48 + 6) // blocks.block_size) for _ in range(200))
    assert blocks.num_blocks >= need
    assert probe.measure_s() > 0
    assert blocks.num_free_blocks == blocks.num_blocks  # every probe sequence finished
