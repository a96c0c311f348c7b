"""``EarlyExitLlamaForCausalLM``: vLLM's Llama with CALM-style early exit on decode rows.

vLLM V1 flattens a step's tokens into one batch and runs one attention call per layer over all
of them, writing each token's K/V into the paged cache first. So the policies it can run are the
batch-wide ones (``full``, ``consensus``, ``quorum``) with ``copy`` fill, and one forward runs:

* every layer in full while any decode row is still running (consensus: rows that took their
  token keep computing, which fills their K/V — Miao et al. 2024);
* once the batching policy stops the decode rows at exit point ℓ, their hidden state is frozen
  at ℓ: deeper layers see it as their input, so the K/V they write is exactly the ``copy`` fill.
  While prompt tokens are in the step the layer still runs in full (their attention needs it)
  and the decode rows' outputs are dropped; without prompt tokens a layer runs K/V only
  (input norm → QKV projection → rotary → cache write).

A decode row's output hidden state is the one where it took its token, so vLLM's own sampler
emits the exit-layer token (exits share the final norm and LM head). Prompt rows always run
every layer. The decisions come from the same ``policies`` objects the native engine uses.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
import torch
from vllm.config import VllmConfig
from vllm.distributed import get_pp_group
from vllm.forward_context import get_forward_context
from vllm.model_executor.layers.attention.attention import unified_kv_cache_update
from vllm.model_executor.models.llama import LlamaForCausalLM

from policies.exit_rules import ExitSignals
from testbed.capture_records import oracle_layers
from testbed.core.exit_point import RowExits, StepCounters, exit_point
from testbed.core.policy_set import build_policies
from testbed.errors import ConfigError
from testbed.model.llama import ExitClassifiers
from testbed.model.signals import (
    SIGNAL_NAMES,
    OracleRows,
    classifier_prob,
    hidden_cosine,
    oracle_signals,
    softmax_margin,
)
from testbed.vllm_backend.options import OVERRIDES_KEY, VllmEarlyExitConfig, parse_overrides
from testbed.vllm_backend.records import RowRecord, StepRecord
from testbed.vllm_backend.serve_log import STEP_LOG

EXIT_HEADS_PREFIX = "exit_heads."


def check_engine(vllm_config: VllmConfig, settings: VllmEarlyExitConfig) -> None:
    """Engine settings that data-dependent exits cannot live with, refused with the reason."""
    if not (settings.policy.batching != "full" or settings.record != "off"):
        return
    if not vllm_config.model_config.enforce_eager:
        raise ConfigError(
            "early exit needs enforce_eager=True (--enforce-eager): a compiled or graph-captured "
            "forward cannot stop at a layer chosen from the data"
        )
    if get_pp_group().world_size != 1:
        raise ConfigError(
            "early exit needs pipeline_parallel_size=1: the exit loop spans all layers"
        )
    if vllm_config.speculative_config is not None:
        raise ConfigError("early exit cannot be combined with speculative decoding")
    if settings.policy.batching != "full" and vllm_config.cache_config.enable_prefix_caching:
        raise ConfigError(
            "early exit needs enable_prefix_caching=False (--no-enable-prefix-caching): cached "
            "blocks would hand filled (approximate) K/V to other requests as if computed in full"
        )


@dataclass
class _Decode:
    """Decode rows of one forward: [rows] numpy masks/lists and [rows, hidden] tensors."""

    tokens: torch.Tensor  # flat-batch index of each decode row's token
    exits: RowExits  # what the exit points decided; vLLM's sampler picks the tokens
    positions: np.ndarray  # [rows] each decode row's position (read once: no sync per layer)
    out_h: list[torch.Tensor | None]  # hidden state where the row took its token
    frozen: torch.Tensor | None = None  # set once the policy stopped the rows
    stop_layer: int | None = None
    signals: list[dict[int, float]] = field(default_factory=list)  # live: layer -> value


@dataclass
class _Counters(StepCounters):
    layers_run: int = 0  # layers the whole flat batch ran (the rest ran K/V only)


@dataclass(frozen=True)
class _LayerSignals:
    """The exit rule's signal from one layer's decode-row states (a SignalSource); records the
    values per row for a live capture."""

    model: EarlyExitLlamaForCausalLM
    h: torch.Tensor
    h_prev: torch.Tensor
    record: list[dict[int, float]]

    def signal(self, layer: int, rows: np.ndarray, name: str) -> np.ndarray:
        values = self.model._signal(layer, self.h[rows], self.h_prev[rows])
        for r, v in zip(rows.tolist(), values.tolist(), strict=True):
            self.record[r][layer] = v
        return values


class EarlyExitLlamaForCausalLM(LlamaForCausalLM):
    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        hf = vllm_config.model_config.hf_config
        self.settings = parse_overrides(getattr(hf, OVERRIDES_KEY, None))
        self.policies = build_policies(self.settings.policy)
        check_engine(vllm_config, self.settings)
        self.num_layers = hf.num_hidden_layers
        # where an oracle recording takes its signals (the policy's exit points and the last)
        self.oracle_layers = oracle_layers(self.settings.policy, self.num_layers)
        self.hidden_size, self.rms_norm_eps = hf.hidden_size, hf.rms_norm_eps
        self.exit_heads: ExitClassifiers | None = None  # set by load_weights when the file exists
        self.records: list[StepRecord] = []  # drained by the in-process capture

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        heads: dict[str, torch.Tensor] = {}

        def model_weights():
            for name, tensor in weights:
                if name.startswith(EXIT_HEADS_PREFIX):  # exit_heads.safetensors
                    heads[name.removeprefix(EXIT_HEADS_PREFIX)] = tensor
                else:
                    yield name, tensor

        loaded = super().load_weights(model_weights())
        if heads:  # the adapter's rank is the file's: its shape is known only now
            rank = heads["down"].shape[-1] if "down" in heads else None
            exit_heads = ExitClassifiers(self.num_layers, self.hidden_size, rank)
            exit_heads.load_state_dict(heads)
            device, dtype = (
                self.model.embed_tokens.weight.device,
                self.model.embed_tokens.weight.dtype,
            )
            self.exit_heads = exit_heads.to(device=device, dtype=dtype).eval()
        elif (
            self.settings.policy.exit_rule == "classifier" and self.policies.batching.is_early_exit
        ):
            raise ConfigError("the classifier rule needs exit_heads.safetensors in the checkpoint")
        return loaded | {EXIT_HEADS_PREFIX + name for name in heads}

    def drain_records(self) -> list[StepRecord]:
        records, self.records = self.records, []
        return records

    def forward(self, input_ids, positions, intermediate_tensors=None, inputs_embeds=None):
        metadata = get_forward_context().attn_metadata
        is_stock = not self.policies.batching.is_early_exit and self.settings.record == "off"
        if is_stock or not metadata or inputs_embeds is not None:  # dummy runs have no metadata
            return super().forward(input_ids, positions, intermediate_tensors, inputs_embeds)
        start_s, start_unix_s = time.perf_counter(), time.time()
        query_start = next(iter(metadata.values())).query_start_loc.cpu().numpy()
        hidden, record = self._early_exit_forward(input_ids, positions, query_start)
        if self.settings.record != "off":
            timing = {"forward_s": time.perf_counter() - start_s, "start_unix_s": start_unix_s}
            record = StepRecord(**{**record.__dict__, **timing})
            self._keep(record)
        return hidden

    def _keep(self, record: StepRecord) -> None:
        if self.settings.record_dir is None:
            self.records.append(record)
            return
        with (self.settings.record_dir / STEP_LOG).open("a") as log:  # `vllm serve`
            log.write(json.dumps(record.to_json()) + "\n")

    @torch.inference_mode()
    def _early_exit_forward(self, input_ids, positions, query_start: np.ndarray):
        num_tokens = int(query_start[-1])  # the rest of the flat batch is padding
        last = query_start[1:] - 1  # [rows] flat index of each row's last token
        is_decode = np.diff(query_start) == 1
        has_prompt = not bool(is_decode.all())
        rows = _Decode(
            tokens=torch.from_numpy(last[is_decode]).to(input_ids.device),
            exits=RowExits.start(int(is_decode.sum()), self.num_layers),
            positions=positions.cpu().numpy()[last[is_decode]],
            out_h=[None] * int(is_decode.sum()),
        )
        rows.signals = [{} for _ in range(len(rows.exits.token))]
        counters = _Counters()
        oracle_states = []
        last_t = torch.from_numpy(last).to(input_ids.device)
        hidden, residual = self.model.embed_input_ids(input_ids), None
        h_prev = hidden[rows.tokens]
        if self.settings.record == "oracle":
            oracle_states.append(hidden[last_t].clone())
        for i, layer in enumerate(self.model.layers):
            if rows.frozen is None or has_prompt:
                if rows.frozen is not None:  # stopped rows' input is their exit state: copy fill
                    hidden[rows.tokens], residual[rows.tokens] = rows.frozen, 0
                hidden, residual = layer(positions, hidden, residual)
                counters.row_layers += num_tokens
                counters.layers_run += 1
            else:
                self._kv_only(layer, positions[rows.tokens], rows.frozen)
                counters.kv_only += len(rows.exits.token)
            if oracle_states:
                oracle_states.append((hidden + residual)[last_t].clone())
            if rows.frozen is None:
                h = (hidden + residual)[rows.tokens]  # [decode rows, hidden]: the true state
                self._exit_point(i + 1, h, h_prev, rows, counters)
                h_prev = h
        final, _ = self.model.norm(hidden, residual)
        for r, h in enumerate(rows.out_h):
            if h is not None:  # the exit-layer token: the exit's norm, then the shared LM head
                final[rows.tokens[r]] = self._exit_norm(rows.exits.token_layer[r], h)
        record = self._record(input_ids, positions, query_start, rows, counters, oracle_states)
        return final, record

    def _kv_only(self, layer, positions: torch.Tensor, h: torch.Tensor) -> None:
        """What a skipped layer owes the cache: input norm, QKV projection, rotary, cache write."""
        attn = layer.self_attn
        qkv, _ = attn.qkv_proj(layer.input_layernorm(h))
        q, k, v = qkv.split([attn.q_size, attn.kv_size, attn.kv_size], dim=-1)
        q, k = attn.rotary_emb(positions, q, k)
        core = attn.attn
        if core.attn_backend.forward_includes_kv_cache_update:
            core(q, k, v)  # this backend writes the cache only while attending; output dropped
        else:
            unified_kv_cache_update(
                k.view(-1, core.num_kv_heads, core.head_size),
                v.view(-1, core.num_kv_heads, core.head_size_v),
                core.layer_name,
            )

    def _exit_point(self, layer, h, h_prev, rows: _Decode, counters) -> None:
        n = len(rows.exits.token)
        # λ is constant here (decay_tau is refused), so max_tokens is never read
        outcome = exit_point(
            self.policies, layer, self.num_layers, rows.exits, eligible=np.ones(n, dtype=bool),
            positions=rows.positions, max_tokens=np.ones(n, dtype=np.int64), counters=counters,
            source=_LayerSignals(self, h, h_prev, rows.signals),
        )  # fmt: skip
        if outcome is None:
            return
        # the policies vLLM runs stop all decode rows together or none (options.REFUSED_*)
        assert len(outcome.stopping) in (0, n), outcome
        rows.exits.take(outcome.takers.tolist(), layer, None)
        for r in outcome.takers.tolist():
            rows.out_h[r] = h[r].clone()
        if len(outcome.stopping):
            rows.frozen, rows.stop_layer = h.clone(), layer

    def _exit_norm(self, layer: int, h: torch.Tensor) -> torch.Tensor:
        """The normed state vLLM's LM head reads for a token taken at ``layer``."""
        if self.exit_heads is not None and self.exit_heads.adapts(layer):
            return self.exit_heads.normed(layer, h, self.rms_norm_eps)
        return self.model.norm(h)

    def _signal(self, layer: int, h: torch.Tensor, h_prev: torch.Tensor) -> np.ndarray:
        name = self.policies.exit_rule.signal
        if name == "hidden_cosine":
            return hidden_cosine(h, h_prev).cpu().numpy()
        if name == "softmax_margin":
            return softmax_margin(self.compute_logits(self._exit_norm(layer, h))).cpu().numpy()
        return classifier_prob(self, self.exit_heads, layer, h).cpu().numpy()

    def _record(self, input_ids, positions, query_start, rows: _Decode, counters, oracle):
        if self.settings.record == "off":
            return None
        query_lens = np.diff(query_start)
        last, is_decode = query_start[1:] - 1, query_lens == 1
        start_s, start_cpu_s = time.perf_counter(), time.process_time()
        oracle_rows = self._oracle(oracle) if oracle else None
        # the oracle's own work is not the step's: the capture takes it out of the step's time
        recording_s, recording_cpu_s = (
            (time.perf_counter() - start_s, time.process_time() - start_cpu_s) if oracle else (0, 0)
        )
        decode_index = np.cumsum(is_decode) - 1
        out = []
        for r, flat in enumerate(last.tolist()):
            d = int(decode_index[r]) if is_decode[r] else None
            exit_layer = self.num_layers
            executed, forced, signals = self.num_layers, False, {}
            if d is not None:
                exit_layer = rows.exits.token_layer[d] or self.num_layers
                executed = rows.stop_layer or self.num_layers
                forced = bool(rows.exits.is_forced[d])
                if rows.signals[d]:
                    values = [rows.signals[d].get(layer) for layer in range(1, self.num_layers + 1)]
                    signals = {self.policies.exit_rule.signal: values}
            argmax = None
            if oracle_rows is not None:
                signals, argmax = oracle_rows.signals[r], oracle_rows.argmax[r]
            out.append(RowRecord(
                is_decode=bool(is_decode[r]), num_query_tokens=int(query_lens[r]),
                position=int(positions[flat]), input_token_id=int(input_ids[flat]),
                exit_layer=exit_layer, is_forced=forced, executed_layers=executed,
                filled_layers=self.num_layers - executed, signals=signals, argmax=argmax,
            ))  # fmt: skip
        return StepRecord(
            rows=tuple(out), num_row_layers_executed=counters.row_layers,
            num_kv_only_row_layers=counters.kv_only, num_rule_evals=counters.rule_evals,
            num_forced_exits=int(rows.exits.is_forced.sum()), num_exit_points=counters.exit_points,
            num_layers_run=counters.layers_run, forward_s=0.0,
            recording_s=recording_s, recording_cpu_s=recording_cpu_s,
        )  # fmt: skip

    def _oracle(self, states: list[torch.Tensor]) -> OracleRows:
        """Every signal and the exit head's argmax at the oracle's layers, for each row's last
        token (the same computation as the native engine's oracle)."""
        return oracle_signals(
            torch.stack(states), self.oracle_layers,
            final_norm=lambda h: self.model.norm(h.flatten(0, 1)).view_as(h),
            logits_of=self.compute_logits, heads=self.exit_heads, eps=self.rms_norm_eps,
        )  # fmt: skip


def _signals(values: dict[str, np.ndarray]) -> ExitSignals:
    return ExitSignals(**{name: values.get(name) for name in SIGNAL_NAMES})
