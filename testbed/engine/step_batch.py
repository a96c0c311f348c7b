"""The tensors of one engine step: every query token ("unit") the step runs, and its rows.

A row is one RowPlan. Its units are its fed tokens and, for decode and resume rows, the
deferred positions of its sequence that ride along (``lazy``/``recompute`` K/V still owed at
deep layers). Each unit enters at its own start layer with its own hidden state.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from testbed.core.block_manager import slots_for_positions
from testbed.core.step import RowPlan, StepPlan
from testbed.engine.kv_cache import DecodeContext
from testbed.model.llama import LlamaModel


@dataclass
class Deferred:
    """A position whose K/V is missing from `layer` upward; ``hidden`` is its state there."""

    position: int
    token_id: int  # the token fed at this position (its layer-0 input)
    layer: int  # layers 0..layer-1 hold its K/V
    hidden: torch.Tensor  # [hidden] state after `layer` layers


@dataclass
class StepBatch:
    rows: tuple[RowPlan, ...]
    hidden: torch.Tensor  # [units, hidden], updated layer by layer
    unit_row: torch.Tensor  # [units] row index
    unit_position: torch.Tensor  # [units]
    unit_start_layer: torch.Tensor  # [units] first layer index the unit runs
    unit_slot: torch.Tensor  # [units] cache slot of its position
    cos: torch.Tensor  # [units, 1, head_dim]
    sin: torch.Tensor
    is_decode_row: np.ndarray  # [rows] decode or resume row (may exit early); policies read it
    main_unit: torch.Tensor  # [rows] unit of the row's newest token (last fed token)
    row_start_layer: np.ndarray  # [rows]
    ctx_slots: list[torch.Tensor]  # per row, slots of positions 0..end-1
    decode_ctx: DecodeContext  # gather plan over all rows (used for single-unit rows)
    deferred_units: dict[int, list[int]]  # seq_id -> unit indices of its deferred positions

    @property
    def num_rows(self) -> int:
        return len(self.rows)


def build_step_batch(
    plan: StepPlan,
    model: LlamaModel,
    block_size: int,
    deferred: dict[int, list[Deferred]],
    parked: dict[int, torch.Tensor],
) -> StepBatch:
    device = model.lm_head_weight().device
    units: list[tuple[int, int, int, int, torch.Tensor | None]] = []  # row, pos, layer, token, h
    deferred_units: dict[int, list[int]] = {}
    main_unit, ctx_slots = [], []
    for r, row in enumerate(plan.rows):
        table = np.asarray(row.block_table)
        ctx_slots.append(
            torch.from_numpy(slots_for_positions(table, block_size, 0, row.end_position)).to(device)
        )
        if not row.is_prefill:
            for d in deferred.get(row.seq_id, ()):
                deferred_units.setdefault(row.seq_id, []).append(len(units))
                units.append((r, d.position, d.layer, d.token_id, d.hidden))
        for offset, token in enumerate(row.token_ids):
            h = parked[row.seq_id] if row.is_resume else None
            units.append((r, row.start_position + offset, row.start_layer, token, h))
        main_unit.append(len(units) - 1)
    rows_t = torch.tensor([u[0] for u in units], device=device)
    pos_t = torch.tensor([u[1] for u in units], device=device)
    tokens = torch.tensor([u[3] for u in units], device=device)
    hidden = model.embed(tokens)  # [units, hidden]
    for i, u in enumerate(units):
        if u[4] is not None:
            hidden[i] = u[4]
    # every unit's slot, gathered from the rows' context slots laid end to end
    offsets = torch.tensor(
        [0, *np.cumsum([len(c) for c in ctx_slots])[:-1].tolist()], device=device
    )
    slots = torch.cat(ctx_slots)[offsets[rows_t] + pos_t]
    cos, sin = model.rope(pos_t, hidden.dtype)
    return StepBatch(
        rows=plan.rows,
        hidden=hidden,
        unit_row=rows_t,
        unit_position=pos_t,
        unit_start_layer=torch.tensor([u[2] for u in units], device=device),
        unit_slot=slots,
        cos=cos,
        sin=sin,
        is_decode_row=np.array([not row.is_prefill for row in plan.rows]),
        main_unit=torch.tensor(main_unit, device=device),
        row_start_layer=np.array([row.start_layer for row in plan.rows]),
        ctx_slots=ctx_slots,
        decode_ctx=DecodeContext.build(
            [row.block_table for row in plan.rows],
            [row.end_position for row in plan.rows],
            device,
        ),
        deferred_units=deferred_units,
    )
