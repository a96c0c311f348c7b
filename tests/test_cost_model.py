"""Cost models (issue 5, item 3): fitted NNLS, roofline, Vidur profiles, depth mapping, factory."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from testbed.sim.cost_model import (
    CostModelError,
    FittedCostModel,
    ModelShape,
    ProfileCostModel,
    RooflineCostModel,
    StepFeatures,
    build_cost_model,
    map_layers,
    nnls,
    price_capture_s,
)
from testbed.sim.roofline import gpu_spec
from testbed.trace import read_capture, read_meta

REPO = Path(__file__).resolve().parents[1]
ORACLE = REPO / "traces" / "samples" / "oracle_cnndm"
LIVE = REPO / "traces" / "samples" / "live_cnndm"
PROFILES = Path(os.environ.get("EETB_DATA_DIR", "data-dir-not-set")) / "vidur_op_profiles"
LLAMA_CSV = PROFILES / "h100_Llama-2-7b-hf_mlp.csv"
needs_profiles = pytest.mark.skipif(not LLAMA_CSV.is_file(), reason="shared Vidur CSVs absent")


def features(layers: int = 32, *, tokens: int = 1, context: int = 1000, kv_only: int = 0,
             rows: int = 1, prefill: int = 0, row_context: int | None = None,
             evals: int = 0, rule: str = "none") -> StepFeatures:  # fmt: skip
    """A step where every one of ``layers`` layers runs the same work."""
    return StepFeatures(
        num_rows=rows, num_prefill_tokens=prefill, num_decode_rows=rows if not prefill else 0,
        num_context_tokens=context if row_context is None else row_context,
        num_row_layers_executed=tokens * layers, num_kv_only_row_layers=kv_only * layers,
        num_rule_evals=evals, rule=rule, layer_tokens=(tokens,) * layers,
        layer_context_tokens=(context,) * layers, layer_kv_only_tokens=(kv_only,) * layers,
    )  # fmt: skip


# --- roofline: one layer of Llama-2-7B on an H100 SXM (989e12 FLOP/s, 3.35e12 B/s), by hand ---
PEAK, BANDWIDTH = 989e12, 3.35e12
LAYER_PARAMS = 4 * 4096**2 + 3 * 4096 * 11008  # Q, K, V, O + gate, up, down
LAYER_BYTES = LAYER_PARAMS * 2  # bf16
KV_BYTES = 2 * 32 * 128 * 2  # K and V, 32 KV heads × 128, bf16: per token per layer
LM_HEAD = 4096 * 32000  # parameters; also its bytes / 2


def h100_7b(**kw) -> RooflineCostModel:
    return RooflineCostModel(gpu_spec("H100"), ModelShape.preset("llama-2-7b"), **kw)


def test_hand_numbers_are_what_the_issue_says():
    assert LAYER_PARAMS == 202_375_168 and LAYER_BYTES == 404_750_336 and KV_BYTES == 16_384


def test_decode_of_one_token_is_memory_bound_on_the_layer_weights():
    flops = 2 * 202_375_168 + 4 * 1000 * 32 * 128  # 421,134,336: weights GEMV + QKᵀ and PV
    num_bytes = 404_750_336 + 1000 * 16_384 + 1 * 16_384  # weights + K/V read + K/V written
    assert flops / PEAK < num_bytes / BANDWIDTH  # 0.43 µs of compute against 125.7 µs of reads
    expected_s = 421_150_720 / 3.35e12
    assert h100_7b().layer_time_s(1, 1000) == pytest.approx(expected_s, rel=1e-12)
    assert expected_s == pytest.approx(LAYER_BYTES / BANDWIDTH, rel=0.05)  # ≈ the weight read
    # the whole 32-layer step adds one LM head for the sampled row, also memory-bound
    lm_head_s = max(2 * LM_HEAD / PEAK, LM_HEAD * 2 / BANDWIDTH)
    step = features(tokens=1, context=1000)
    assert h100_7b().step_time_s(step) == pytest.approx(32 * expected_s + lm_head_s, rel=1e-12)


def test_prefill_of_4096_tokens_is_compute_bound():
    one_layer = replace(ModelShape.preset("llama-2-7b"), num_layers=1)
    model = RooflineCostModel(gpu_spec("h100-sxm"), one_layer)
    attended = 4096 * 4097 // 2  # token i attends i positions: 8,390,656 in all
    flops = 2 * 4096 * 202_375_168 + 4 * attended * 32 * 128  # 1,795,329,884,160
    # bytes: weights + each K/V position read once by the row (flash attention) + K/V written
    num_bytes = 404_750_336 + 4096 * 16_384 + 4096 * 16_384  # 538,968,064
    assert flops == 1_795_329_884_160 and num_bytes / BANDWIDTH < flops / PEAK
    lm_head_s = max(2 * LM_HEAD / PEAK, LM_HEAD * 2 / BANDWIDTH)  # the prompt's sampled token
    step = features(1, tokens=4096, context=attended, prefill=4096, row_context=4096)
    assert model.step_time_s(step) == pytest.approx(flops / PEAK + lm_head_s, rel=1e-12)
    assert flops / PEAK == pytest.approx(1.8153e-3, rel=1e-4)


def test_grouping_64_decode_rows_costs_far_less_than_64_single_steps():
    model = h100_7b()
    single = model.step_time_s(features(tokens=1, context=1000))
    grouped = model.step_time_s(features(tokens=64, context=64 * 1000, rows=64))
    assert grouped < 64 * single / 10
    assert model.layer_time_s(0, 0) == 0.0  # a layer nobody runs reads no weights


def test_fill_softmax_rule_efficiency_and_overhead_terms():
    model = h100_7b()
    base = model.step_time_s(features())
    kv_proj = 2 * 4096 * 32 * 128  # K and V projection parameters
    fill_s = max(2 * 3 * kv_proj / PEAK, (kv_proj * 2 + 3 * KV_BYTES) / BANDWIDTH)
    assert model.step_time_s(features(kv_only=3)) == pytest.approx(base + 32 * fill_s)
    evals_s = max(2 * LM_HEAD * 5 / PEAK, LM_HEAD * 2 / BANDWIDTH)
    assert model.step_time_s(features(evals=5, rule="softmax")) == pytest.approx(base + evals_s)
    assert model.step_time_s(features(evals=5, rule="hidden")) == base
    assert h100_7b(efficiency=0.5).step_time_s(features()) == pytest.approx(2 * base)
    assert h100_7b(overhead_s=1e-3).step_time_s(features()) == pytest.approx(base + 1e-3)
    with pytest.raises(CostModelError, match="efficiency"):
        h100_7b(efficiency=0)


def test_roofline_maps_a_shallower_trace_by_relative_depth():
    model = h100_7b()
    assert model.step_time_s(features(8, tokens=5)) == pytest.approx(
        model.step_time_s(features(32, tokens=5))
    )
    with pytest.raises(CostModelError, match="differ in length"):
        model.step_time_s(features(8)._replace(layer_kv_only_tokens=(0,) * 7))


def test_model_shape_from_hf_config_and_capture_meta():
    config = {"num_hidden_layers": 32, "hidden_size": 4096, "intermediate_size": 11008,
              "num_attention_heads": 32, "vocab_size": 32000, "torch_dtype": "float16",
              "max_position_embeddings": 4096}  # fmt: skip
    assert ModelShape.from_hf_config(config) == ModelShape.preset("llama-2-7b")
    shape = ModelShape.from_capture_meta(read_meta(ORACLE))
    assert (shape.num_layers, shape.hidden_size, shape.num_kv_heads, shape.head_dim) == (
        8,
        256,
        4,
        32,
    )
    with pytest.raises(CostModelError, match="vocab_size"):
        ModelShape.from_hf_config({k: v for k, v in config.items() if k != "vocab_size"})


# --- relative-depth mapping ---


def test_map_layers_8_to_32_repeats_and_32_to_8_averages():
    eight = (8, 7, 6, 5, 4, 3, 2, 1)
    assert map_layers(eight, 32) == tuple(x for x in eight for _ in range(4))
    thirty_two = tuple(range(32, 0, -1))
    mapped = map_layers(thirty_two, 8)
    assert sum(mapped) == sum(thirty_two) * 8 // 32  # 132
    assert all(abs(m - np.mean(thirty_two[4 * i : 4 * i + 4])) <= 0.5 for i, m in enumerate(mapped))
    assert map_layers(eight, 8) == eight


@given(st.lists(st.integers(0, 10_000), min_size=1, max_size=40), st.integers(1, 80))
def test_map_layers_preserves_token_layers_scaled_by_depth(counts, target):
    mapped = map_layers(tuple(counts), target)
    assert len(mapped) == target and min(mapped) >= 0
    exact = sum(counts) * target / len(counts)
    assert abs(sum(mapped) - exact) <= 0.5
    if len(set(counts)) == 1:  # the same work at every depth stays the same
        assert set(mapped) == {counts[0]}


def test_map_layers_rejects_impossible_mappings():
    with pytest.raises(CostModelError, match="onto 0 layers"):
        map_layers((1, 2), 0)
    with pytest.raises(CostModelError, match="no layers"):
        map_layers((), 4)
    with pytest.raises(CostModelError, match="non-negative"):
        map_layers((1, -2), 4)


# --- fitted ---

TRUE_COEF = {
    "overhead": 2e-3, "row_layers": 5e-6, "kv_only_row_layers": 1e-6, "prefill_tokens": 0.0,
    "context_tokens": 3e-8, "rule_evals_hidden": 2e-6, "rule_evals_softmax": 4e-5,
    "attention_pairs": 2e-10, "sampling_layers": 2.5e-4,
}  # fmt: skip


def synthetic_steps(n: int, seed: int = 0) -> tuple[list[StepFeatures], np.ndarray]:
    rng = np.random.default_rng(seed)
    steps, durations = [], []
    for _ in range(n):
        rule = str(rng.choice(["none", "hidden", "softmax"]))
        f = StepFeatures(
            num_rows=int(rng.integers(1, 64)), num_prefill_tokens=int(rng.integers(0, 2048)),
            num_decode_rows=0, num_context_tokens=int(rng.integers(0, 50_000)),
            num_row_layers_executed=int(rng.integers(1, 4000)),
            num_kv_only_row_layers=int(rng.integers(0, 500)),
            num_rule_evals=0 if rule == "none" else int(rng.integers(0, 300)), rule=rule,
            layer_tokens=(), layer_context_tokens=(), layer_kv_only_tokens=(),
            num_attention_pairs=int(rng.integers(0, 4_000_000)),
            num_sampling_layers=int(rng.integers(1, 9)),
        )  # fmt: skip
        term = {"attention_pairs": f.num_attention_pairs, "sampling_layers": f.num_sampling_layers, "overhead": 1, "row_layers": f.num_row_layers_executed,
                "kv_only_row_layers": f.num_kv_only_row_layers,
                "prefill_tokens": f.num_prefill_tokens, "context_tokens": f.num_context_tokens,
                f"rule_evals_{rule}": f.num_rule_evals}  # fmt: skip
        durations.append(sum(TRUE_COEF.get(k, 0.0) * v for k, v in term.items()))
        steps.append(f)
    return steps, np.array(durations)


def test_fitted_recovers_known_coefficients_and_keeps_a_zero_at_zero():
    steps, durations = synthetic_steps(300)
    model, report = FittedCostModel.fit(steps, durations)
    assert report.r2 == pytest.approx(1.0, abs=1e-9) and report.num_steps == 300
    assert set(report.coefficients) == set(TRUE_COEF) | {"layers_run", "exit_points"}
    assert report.coefficients["layers_run"] == 0.0  # synthetic steps have no such work
    assert report.coefficients["exit_points"] == 0.0
    for name, value in TRUE_COEF.items():
        assert report.coefficients[name] == pytest.approx(value, rel=1e-6, abs=1e-12), name
    assert model.step_time_s(steps[7]) == pytest.approx(durations[7], rel=1e-6)
    assert model.prices_rule("softmax") and not model.prices_rule("classifier")
    assert "rule_evals_softmax" in report.table() and "R²" in report.table()


def test_fitted_clamps_at_zero_where_least_squares_would_go_negative():
    steps, durations = synthetic_steps(300, seed=1)
    noisy = durations + np.random.default_rng(2).normal(0, 2e-4, len(durations))
    rows = [{**f._asdict(), "num_prefill_tokens": 0} for f in steps]  # dicts work too
    rows[0]["num_prefill_tokens"] = 10_000  # an outlier pulling the prefill slope negative
    noisy[0] = 0.0
    _, report = FittedCostModel.fit(rows, noisy)
    assert min(report.coefficients.values()) >= 0.0
    assert report.coefficients["prefill_tokens"] == 0.0


def test_nnls_matches_scipy_on_random_problems():
    scipy_optimize = pytest.importorskip("scipy.optimize")
    rng = np.random.default_rng(0)
    for _ in range(100):
        a = rng.normal(size=(int(rng.integers(3, 30)), int(rng.integers(1, 8))))
        b = rng.normal(size=a.shape[0])
        ours, (theirs, _) = nnls(a, b), scipy_optimize.nnls(a, b)
        assert (ours >= 0).all()
        assert np.linalg.norm(a @ ours - b) <= np.linalg.norm(a @ theirs - b) + 1e-9


def test_fitted_on_the_sample_captures():
    model, report = FittedCostModel.from_steps_parquet(ORACLE)
    assert report.r2 > 0.5 and min(report.coefficients.values()) >= 0
    assert not any(k.startswith("rule_evals_") for k in report.coefficients)  # full batching
    assert model.report is report
    _, live = FittedCostModel.from_steps_parquet(LIVE / "steps.parquet")
    assert "rule_evals_hidden" in live.coefficients and live.r2 > 0.5


@pytest.mark.parametrize(
    ("durations", "match"),
    [([0.01] * 3, "at least 9 steps"), ([0.01] * 10, "same time"), ([-1.0] + [0.01] * 9, ">= 0")],
)
def test_fitted_rejects_bad_fits(durations, match):
    steps, _ = synthetic_steps(len(durations))
    with pytest.raises(CostModelError, match=match):
        FittedCostModel.fit([s._replace(rule="none") for s in steps], durations)


def test_fitted_rejects_bad_inputs(tmp_path):
    with pytest.raises(CostModelError, match="lacks 'num_kv_only_row_layers'"):
        FittedCostModel.fit([{"num_row_layers_executed": 1}], [0.1])
    with pytest.raises(CostModelError, match="unknown terms"):
        FittedCostModel(("overhead", "flux"), (1.0, 2.0))
    with pytest.raises(CostModelError, match="finite and >= 0"):
        FittedCostModel(("overhead",), (-1.0,))
    with pytest.raises(CostModelError, match=str(tmp_path / "nope")):
        FittedCostModel.from_steps_parquet(tmp_path / "nope")


# --- profile (Vidur CSV) ---


@needs_profiles
def test_profile_time_grows_with_tokens_and_depth_comes_from_the_shape():
    model = ProfileCostModel.from_csv(LLAMA_CSV)
    assert model.num_layers == 32  # the profiled width is Llama-2-7B's
    times = [model.step_time_s(features(tokens=n)) for n in (1, 64, 512, 2048, 4096, 8192)]
    assert times == sorted(times) and len(set(times)) == len(times)
    assert times[-1] == pytest.approx(2 * times[-2], rel=0.05)  # proportional past 4096 tokens
    assert model.step_time_s(features(8, tokens=64)) == pytest.approx(times[1])  # mapped 8→32
    assert model.step_time_s(features(tokens=0, context=0, rows=0)) == 0.0
    assert ProfileCostModel.from_csv(PROFILES / "h100_phi-2_mlp.csv").num_layers is None


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("a,b\n1,2\n", "no num_tokens column"),
        ("num_tokens,n_head\n1,32\n", "no time_stats"),
        ("num_tokens,time_stats.add.median\n1,fast\n", "not numeric"),
        ("num_tokens,num_tensor_parallel_workers,time_stats.add.median\n1,2,0.1\n", "= 1"),
        ("num_tokens\n", "no data rows"),
    ],
)
def test_profile_rejects_bad_csvs_naming_the_file(tmp_path, text, match):
    path = tmp_path / "bad.csv"
    path.write_text(text)
    with pytest.raises(CostModelError, match=match) as info:
        ProfileCostModel.from_csv(path)
    assert str(path) in str(info.value)


def test_profile_rejects_a_missing_file(tmp_path):
    with pytest.raises(CostModelError, match="does not exist"):
        ProfileCostModel.from_csv(tmp_path / "absent.csv")


# --- factory ---


def test_factory_builds_each_kind():
    meta = read_meta(ORACLE)
    assert build_cost_model("roofline:H100", trace_meta=meta).shape.num_layers == 8
    assert build_cost_model("roofline:a100:llama-2-13b").shape == ModelShape.preset("llama-2-13b")
    fitted = build_cost_model(f"fitted:{ORACLE}")
    assert fitted.name == "fitted" and fitted.report.r2 > 0.5
    if LLAMA_CSV.is_file():
        assert build_cost_model(f"profile:{LLAMA_CSV}").num_layers == 32
        assert build_cost_model(f"profile:{LLAMA_CSV}:llama-2-13b").num_layers == 40


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ("magic:x", r"known: fitted:\[F\*\]PATH.*, roofline:GPU"),
        ("roofline:", "lacks its argument"),
        ("roofline:tpu-v9", "unknown GPU 'tpu-v9'; known: a100-40gb"),
        ("roofline:h100:gpt-9", "presets: llama-2-7b"),
        ("roofline:h100", "no model and there is no trace"),
        ("fitted:/no/such/capture", "/no/such/capture"),
    ],
)
def test_factory_rejects_bad_specs(spec, match):
    with pytest.raises(CostModelError, match=match):
        build_cost_model(spec)


def test_a_time_factor_scales_any_model_and_each_fitted_capture():
    steps, _ = synthetic_steps(5)
    base = build_cost_model(f"fitted:{ORACLE}")
    slow = build_cost_model(f"1.25*fitted:{ORACLE}")
    assert slow.name == base.name == "fitted"
    for f in steps:
        assert slow.step_time_s(f) == pytest.approx(1.25 * base.step_time_s(f))
    roof = build_cost_model("roofline:H100:llama-2-7b")
    f = steps[0]._replace(layer_tokens=(10,) * 32, layer_context_tokens=(900,) * 32,
                layer_kv_only_tokens=(0,) * 32)  # fmt: skip
    half = build_cost_model("0.5*roofline:H100:llama-2-7b").step_time_s(f)
    assert half == pytest.approx(0.5 * roof.step_time_s(f)) and half > 0
    # inside a fit, F*DIR scales that capture's durations: a capture made at half speed and
    # scaled by 0.5 fits like the capture itself, so both parts agree with one fit of it alone
    alone_model, alone = FittedCostModel.from_steps_parquet(str(ORACLE))
    _, doubled = FittedCostModel.from_steps_parquet(f"2*{ORACLE}")
    mixed_model, _ = FittedCostModel.from_steps_parquet(f"{ORACLE}+0.5*{ORACLE}")
    for name, value in alone.coefficients.items():
        assert doubled.coefficients[name] == pytest.approx(2 * value, rel=1e-6, abs=1e-12)
    # a `full` capture samples once a step, so overhead and sampling_layers split one cost in
    # whichever way: compare what the fits predict for the capture's steps
    rows = read_capture(ORACLE).steps.to_pylist()
    for row in rows:
        row["rule"] = "none"
    steps = [SimpleNamespace(**row) for row in rows]
    for f in steps:
        assert mixed_model.step_time_s(f) == pytest.approx(0.75 * alone_model.step_time_s(f))
    for bad in ("0*roofline:H100:llama-2-7b", f"fitted:0*{ORACLE}"):
        with pytest.raises(CostModelError, match="> 0"):
            build_cost_model(bad)


def test_cost_models_import_no_torch():
    code = "import sys, testbed.sim.cost_model; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_price_capture_is_the_fit_price_of_the_captures_own_steps():
    model, _ = FittedCostModel.from_steps_parquet(f"2*{ORACLE}")
    priced_s, measured_s = price_capture_s(model, ORACLE)
    rows = read_capture(ORACLE).steps.to_pylist()
    assert measured_s == pytest.approx(sum(row["duration_s"] for row in rows))
    priced_each = [model.step_time_s(SimpleNamespace(**row, rule="none")) for row in rows]
    assert priced_s == pytest.approx(sum(priced_each))
    # fitted on the capture's durations doubled: it ran in about half the time the fit prices
    assert 0.4 < measured_s / priced_s < 0.6


@needs_profiles
def test_the_roofline_is_a_lower_bound_within_2_5x_of_vidurs_measured_h100_layers():
    spec = importlib.util.spec_from_file_location(
        "roofline_vs_vidur", Path(__file__).resolve().parent.parent / "scripts/roofline_vs_vidur.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    for tokens, measured_ms, roofline_ms in module.compare(LLAMA_CSV):
        assert 1.0 <= measured_ms / roofline_ms <= 2.5, (tokens, measured_ms, roofline_ms)
