"""Live and oracle captures of a validation on the chosen engine, and which are finished."""

from __future__ import annotations

import copy
import json
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from testbed import atomic
from testbed.core import SchedulerConfig
from testbed.core.policy_set import PolicyConfig
from testbed.errors import ConfigError
from testbed.runinfo import to_jsonable
from testbed.validate.config import PROBES_PER_SIDE, ValidationConfig, ValidationError
from testbed.validate.speed import speed_file


class EngineRuns:
    """Live and oracle captures on the chosen engine, for this run's requests."""

    def __init__(self, cfg: ValidationConfig) -> None:
        from testbed.builtin_model import resolve_model_dir
        from testbed.engine.capture import build_requests
        from testbed.model.checkpoint import load_checkpoint

        self.cfg = cfg
        self.model_dir = resolve_model_dir(cfg.model)
        self.ckpt = load_checkpoint(self.model_dir)
        self.max_model_len = min(
            SchedulerConfig().max_model_len, self.ckpt.config.max_position_embeddings
        )
        self.requests, _ = build_requests(
            cfg.workload, cfg.dataset, self.ckpt, seed=cfg.seed, data_dir=cfg.data_dir
        )
        self._probe = None  # SpeedProbe, made when first timed

    def with_config(self, cfg: ValidationConfig) -> EngineRuns:
        """This loaded model and request stream under another configuration list."""
        same = ("workload", "engine", "model", "dataset", "seed", "data_dir")
        if any(getattr(cfg, k) != getattr(self.cfg, k) for k in same):
            raise ValidationError(
                f"an engine loaded for {self.cfg.workload!r} cannot run another setup"
            )
        other = copy.copy(self)
        other.cfg = cfg
        return other

    @property
    def scheduler(self) -> SchedulerConfig:
        return SchedulerConfig(max_model_len=self.max_model_len)

    @property
    def kv_blocks(self) -> dict[str, int]:
        """SimulationConfig's K/V fields for this engine: the native engine's own block count,
        which sets how many sequences run at once (SmolLM2's 256 MB hold 364 blocks, the
        simulator's default is 4096: simulated with those, 16 long Azure prompts ran all at
        once and the mean TPOT came out twice the engine's). Empty for vLLM, which sizes its
        cache when it starts: the simulation reads its blocks off the oracle trace it wrote."""
        if self.cfg.engine != "native":
            return {}
        engine, model = self.engine_config(PolicyConfig()), self.ckpt.model.config
        num_blocks = engine.num_kv_blocks(num_layers=model.num_layers,
                                          num_kv_heads=model.num_key_value_heads,
                                          head_dim=model.head_size)  # fmt: skip
        return {"num_kv_blocks": num_blocks, "block_size": engine.block_size}

    def engine_config(self, policy: PolicyConfig):
        """The native engine's configuration for a run of ``policy`` (its K/V memory: the
        default), which the captures and the simulations' K/V capacity share."""
        from testbed.capture_records import EngineConfig

        return EngineConfig(policy=policy, scheduler=self.scheduler,
                            device=self.cfg.device, dtype=self.cfg.dtype)  # fmt: skip

    def probe_s(self) -> float:
        """The speed probe's seconds now (built on first use; one warm-up run)."""
        from testbed.engine.speed_probe import SpeedProbe

        if self._probe is None:
            self._probe = SpeedProbe(self.ckpt, device=self.cfg.device, dtype=self.cfg.dtype)
            self._probe.measure_s()
        return self._probe.measure_s()

    def timed_capture(self, policy: PolicyConfig, mode: str, out: Path, requests=None) -> Path:
        """``capture`` between PROBES_PER_SIDE speed probes on each side, recorded in
        ``speed_file(out)`` last: a run without that file is unfinished."""
        speed_file(out).unlink(missing_ok=True)
        before_s = [self.probe_s() for _ in range(PROBES_PER_SIDE)]
        path = self.capture(policy, mode, out, requests)
        after_s = [self.probe_s() for _ in range(PROBES_PER_SIDE)]
        write_doc(speed_file(out), {"before_s": before_s, "after_s": after_s})
        return path

    def capture(self, policy: PolicyConfig, mode: str, out: Path, requests=None) -> Path:
        from testbed.capture_records import CaptureConfig
        from testbed.engine.capture import run_capture

        reqs = self.requests if requests is None else requests
        engine_cfg = self.engine_config(policy)
        cap = CaptureConfig(mode=mode, engine=engine_cfg, workload=self.cfg.workload,
                            seed=self.cfg.seed)  # fmt: skip
        shutil.rmtree(out, ignore_errors=True)  # an unfinished earlier attempt
        if self.cfg.engine == "native":
            return run_capture(self.ckpt, reqs, cap, out)
        try:  # optional dependency: the `vllm` extra
            from testbed.vllm_backend.capture import run_vllm_capture
        except ImportError as exc:
            raise ConfigError(
                f"--engine vllm needs vLLM: pip install -e '.[vllm]' ({exc})"
            ) from None
        return run_vllm_capture(self.model_dir, reqs, cap, out)

    def calibration_requests(self, workload: str):
        # another seed: the calibration never sees the validation's own requests
        from testbed.engine.capture import build_requests

        reqs, _ = build_requests(
            workload,
            self.cfg.dataset,
            self.ckpt,
            seed=self.cfg.seed + 1,
            data_dir=self.cfg.data_dir,
        )
        return reqs

    def decode(self, token_ids: Sequence[int]) -> str:
        return self.ckpt.tokenizer.decode(list(token_ids))


def _is_finished(run: Path) -> bool:
    return (run / "meta.json").is_file() and speed_file(run).is_file()


def _is_finished_run_of(run: Path, policy: PolicyConfig) -> bool:
    """A finished run to reuse. One of another policy is an error, not a result to reuse or
    overwrite: OUT was made for another configuration list (another --top, another sweep)."""
    if not _is_finished(run):
        return False
    recorded = json.loads((run / "meta.json").read_text()).get("policy")
    if recorded != to_jsonable(policy):
        raise ValidationError(
            f"{run} is a run of another policy than {policy.label()}: this folder was made "
            "for another configuration list; give a new --out"
        )
    return True


def write_doc(path: Path, doc: dict[str, Any]) -> None:
    atomic.write_json(path, to_jsonable(doc))
