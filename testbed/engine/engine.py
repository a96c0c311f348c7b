"""The native early-exit engine: schedule → run → postprocess, offline or arrival-paced."""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Iterable, Sequence

from tokenizers import Tokenizer

from testbed.capture_records import EngineConfig, RequestOutput
from testbed.core import BlockManager, Scheduler, SchedulerConfig
from testbed.core import Sequence as SeqState
from testbed.core.policy_set import build_policies
from testbed.core.step import StepPlan, StepResult
from testbed.engine.device import place, resolve_device, resolve_dtype
from testbed.engine.kv_cache import KVCacheShape, PagedKVCache
from testbed.engine.runner import ModelRunner, SeqMeta
from testbed.engine.sampler import Sampler, SamplingParams
from testbed.errors import ConfigError
from testbed.model.checkpoint import Checkpoint

log = logging.getLogger(__name__)
StepHook = Callable[[StepPlan, StepResult], None]


class LLMEngine:
    def __init__(self, checkpoint: Checkpoint, config: EngineConfig = EngineConfig()) -> None:
        self.checkpoint, self.config = checkpoint, config
        cfg = checkpoint.model.config
        self.policies = build_policies(config.policy, num_layers=cfg.num_layers)
        if config.policy.exit_rule == "classifier" and checkpoint.exit_heads is None:
            raise ConfigError(f"{checkpoint.path} has no exit_heads.safetensors for 'classifier'")
        self.device, dtype = resolve_device(config.device), resolve_dtype(config.dtype)
        model = place(checkpoint.model, self.device, dtype)
        num_blocks = config.num_kv_blocks(num_layers=cfg.num_layers,
                                          num_kv_heads=cfg.num_key_value_heads,
                                          head_dim=cfg.head_size)  # fmt: skip
        if num_blocks < 1:
            raise ConfigError(f"kv_cache_mb={config.kv_cache_mb} holds no block")
        shape = KVCacheShape(
            cfg.num_layers, num_blocks, config.block_size, cfg.num_key_value_heads, cfg.head_size
        )
        self.block_manager = BlockManager(num_blocks, config.block_size)
        max_len = min(config.scheduler.max_model_len, cfg.max_position_embeddings)
        sched_cfg = config.scheduler
        if max_len != sched_cfg.max_model_len:
            sched_cfg = SchedulerConfig(**{**sched_cfg.__dict__, "max_model_len": max_len})
        self.scheduler = Scheduler(
            sched_cfg, self.block_manager, resume_policy=self.policies.batching
        )
        self.runner = ModelRunner(
            model,
            place(checkpoint.exit_heads, self.device, dtype),
            PagedKVCache(shape, dtype, self.device),
            self.policies,
            Sampler(config.seed),
        )
        self._next_seq_id = 0
        self._outputs: dict[int, RequestOutput] = {}
        self.step_hooks: list[StepHook] = []

    @property
    def tokenizer(self) -> Tokenizer | None:
        return self.checkpoint.tokenizer

    @property
    def num_layers(self) -> int:
        return self.checkpoint.model.num_layers

    def encode(self, prompt: str | Sequence[int]) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ConfigError("text prompts need a tokenizer in the checkpoint")
            # the checkpoint's prompt format: BOS + text, or the chat template of an instruct model
            bos = self.checkpoint.config.bos_token_id
            return self.checkpoint.prompt.encode(self.tokenizer, prompt, bos)
        return list(prompt)

    def add_request(
        self, prompt: str | Sequence[int], params: SamplingParams, *, arrival_s: float = 0.0
    ) -> int:
        """Queue one request; raises a typed error (and queues nothing) when it cannot run."""
        ids = self.encode(prompt)
        eos = None if params.ignore_eos else self.checkpoint.config.eos_token_id
        seq = SeqState(
            seq_id=self._next_seq_id, prompt_token_ids=tuple(ids), max_tokens=params.max_tokens,
            arrival_s=arrival_s, eos_token_id=eos,
        )  # fmt: skip
        self.scheduler.add(seq)
        self._next_seq_id += 1
        self.runner.add_sequence(seq.seq_id, SeqMeta(len(ids), params))
        self._outputs[seq.seq_id] = RequestOutput(
            seq.seq_id, tuple(ids), [], [], arrival_s=arrival_s
        )
        return seq.seq_id

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    def step(self, now_s: Callable[[], float] | None = None) -> list[RequestOutput]:
        """One iteration; returns requests that finished in it."""
        start_s, start_cpu_s = time.perf_counter(), time.process_time()
        plan = self.scheduler.schedule()
        if plan.is_empty:
            return []
        result = self.runner.execute(plan)
        finished = self.scheduler.update(plan, result)
        # a step's duration is the whole iteration (scheduling included), what a simulated step
        # stands for; the runner's own share was result.duration_s
        result = dataclasses.replace(
            result, duration_s=time.perf_counter() - start_s,
            cpu_s=time.process_time() - start_cpu_s,
        )  # fmt: skip
        t = now_s() if now_s is not None else None
        for row in result.rows:
            if row.token_id is not None:
                out = self._outputs[row.seq_id]
                out.token_ids.append(row.token_id)
                out.exit_layers.append(row.exit_layer)
                if out.first_token_s is None:
                    out.first_token_s = t
        for hook in self.step_hooks:
            hook(plan, result)
        done = []
        for seq in finished:
            out = self._outputs.pop(seq.seq_id)
            out.finish_s, out.num_preemptions = t, seq.num_preemptions
            if self.tokenizer is not None:
                out.text = self.tokenizer.decode(
                    [x for x in out.token_ids if x != seq.eos_token_id]
                )
            self.runner.release(seq.seq_id)
            done.append(out)
        return done

    def generate(
        self, prompts: Iterable[str | Sequence[int]], params: SamplingParams = SamplingParams()
    ) -> list[RequestOutput]:
        """Offline: all prompts at once; outputs in prompt order."""
        ids = [self.add_request(p, params) for p in prompts]
        done: dict[int, RequestOutput] = {}
        while self.has_unfinished():
            for out in self.step():
                done[out.seq_id] = out
        return [done[i] for i in ids]

    def run(
        self,
        requests: Sequence[tuple[float, str | Sequence[int], SamplingParams]],
        on_finish: Callable[[RequestOutput], None] | None = None,
    ) -> list[RequestOutput]:
        """Arrival-paced on the real clock: (arrival_s, prompt, params) each; outputs in request
        order. ``on_finish`` sees each request as it finishes (progress, trace capture)."""
        order = sorted(range(len(requests)), key=lambda i: requests[i][0])
        start = time.perf_counter()
        clock = lambda: time.perf_counter() - start  # noqa: E731
        ids: dict[int, int] = {}
        done: dict[int, RequestOutput] = {}
        nxt = 0
        while nxt < len(order) or self.has_unfinished():
            while nxt < len(order) and requests[order[nxt]][0] <= clock():
                arrival, prompt, params = requests[order[nxt]]
                ids[order[nxt]] = self.add_request(prompt, params, arrival_s=arrival)
                nxt += 1
            if not self.has_unfinished():
                time.sleep(max(0.0, min(0.01, requests[order[nxt]][0] - clock())))
                continue
            for out in self.step(clock):
                done[out.seq_id] = out
                if on_finish is not None:
                    on_finish(out)
        return [done[ids[i]] for i in range(len(requests))]
