"""Workloads: arrival processes, trace readers, transforms, clipping, prompts, workload strings."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from testbed.errors import WorkloadError
from testbed.workload.arrivals import gamma_arrivals, poisson_arrivals
from testbed.workload.lengths import build_lengths, workload_lengths
from testbed.workload.prompts import attach_prompts, synthetic_prompts
from testbed.workload.readers import (
    read_azure_csv,
    read_length_csv,
    read_mooncake_jsonl,
    resolve_path,
)
from testbed.workload.spec import LengthSpec, WorkloadSpec, parse_workload
from testbed.workload.transforms import (
    ClipReport,
    clip_lengths,
    mean_rate_per_s,
    rescale_rate,
    take,
    time_scale,
)

AZURE_FILE = "azure_llm_trace_2023/AzureLLMInferenceTrace_conv.csv"
# the public file's form: 7-digit fractions and no newline after the last row
AZURE_TEXT = (
    "TIMESTAMP,ContextTokens,GeneratedTokens\n"
    "2023-11-16 18:15:46.6805900,374,44\n"
    "2023-11-16 18:15:50.9951690,396,109\n"
    "2023-11-16 18:16:00.0000001,10,0"
)


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def _gaps(arrivals_s: np.ndarray) -> np.ndarray:
    return np.diff(arrivals_s)


# ---- arrival processes -------------------------------------------------------------------------


def test_poisson_mean_rate_and_cv():
    arrivals_s = poisson_arrivals(4.0, 5000, seed=1)
    assert arrivals_s.shape == (5000,) and arrivals_s[0] == 0.0
    assert np.all(_gaps(arrivals_s) >= 0)
    assert (len(arrivals_s) - 1) / arrivals_s[-1] == pytest.approx(4.0, rel=0.05)
    gaps = _gaps(arrivals_s)
    assert gaps.std() / gaps.mean() == pytest.approx(1.0, rel=0.08)


@pytest.mark.parametrize("cv", [0.5, 1.0, 3.0])
def test_gamma_mean_rate_and_cv(cv):
    arrivals_s = gamma_arrivals(2.0, cv, 5000, seed=2)
    gaps = _gaps(arrivals_s)
    # heavy-tailed gaps (cv=3) make the sample mean noisier, hence the wider band
    assert 1.0 / gaps.mean() == pytest.approx(2.0, rel=0.1)
    assert gaps.std() / gaps.mean() == pytest.approx(cv, rel=0.15)


def test_arrivals_are_seeded():
    assert np.array_equal(poisson_arrivals(2.0, 50, 7), poisson_arrivals(2.0, 50, 7))
    assert not np.array_equal(poisson_arrivals(2.0, 50, 7), poisson_arrivals(2.0, 50, 8))
    same = gamma_arrivals(2.0, 3.0, 50, seed=7)
    assert np.array_equal(same, gamma_arrivals(2.0, 3.0, 50, seed=7))
    assert not np.array_equal(same, gamma_arrivals(2.0, 3.0, 50, seed=8))
    assert np.array_equal(poisson_arrivals(2.0, 1, 0), [0.0])


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: poisson_arrivals(0.0, 10, 0), "rate"),
        (lambda: poisson_arrivals(-1.0, 10, 0), "rate"),
        (lambda: poisson_arrivals(float("nan"), 10, 0), "rate"),
        (lambda: poisson_arrivals(1.0, 0, 0), "number of requests"),
        (lambda: gamma_arrivals(1.0, 0.0, 10, seed=0), "coefficient of variation"),
        (lambda: gamma_arrivals(1.0, -2.0, 10, seed=0), "coefficient of variation"),
    ],
)
def test_arrival_arguments_are_validated(call, match):
    with pytest.raises(WorkloadError, match=match):
        call()


# ---- trace readers -----------------------------------------------------------------------------


def test_azure_csv_without_trailing_newline(tmp_path):
    specs = read_azure_csv(_write(tmp_path / "azure.csv", AZURE_TEXT))
    assert [(s.num_prompt_tokens, s.num_output_tokens) for s in specs] == [
        (374, 44),
        (396, 109),
        (10, 0),
    ]
    assert specs[0].arrival_s == 0.0
    assert specs[1].arrival_s == pytest.approx(4.314579, abs=1e-6)
    assert specs[2].arrival_s == pytest.approx(13.3194101, abs=1e-6)


def test_azure_csv_numeric_timestamps_are_sorted(tmp_path):
    text = "TIMESTAMP,ContextTokens,GeneratedTokens,extra\n105.5,3,4,x,surplus\n\n100,1,2,y\n"
    specs = read_azure_csv(_write(tmp_path / "azure.csv", text))
    assert specs == [LengthSpec(0.0, 1, 2), LengthSpec(5.5, 3, 4)]


def test_azure_csv_time_zones(tmp_path):
    text = (
        "TIMESTAMP,ContextTokens,GeneratedTokens\n"
        "2023-11-16T18:00:00Z,1,1\n"
        "2023-11-16T19:00:01.5+01:00,1,1\n"
    )
    specs = read_azure_csv(_write(tmp_path / "azure.csv", text))
    assert [s.arrival_s for s in specs] == pytest.approx([0.0, 1.5])


def test_mooncake_jsonl(tmp_path):
    rows = [
        {"timestamp": 1000, "input_length": 50, "output_length": 5, "hash_ids": [1, 2]},
        {"timestamp": 3500, "input_length": 60, "output_length": 6},
    ]
    file = _write(tmp_path / "m.jsonl", "\n".join(json.dumps(r) for r in rows) + "\n\n")
    assert read_mooncake_jsonl(file) == [LengthSpec(0.0, 50, 5), LengthSpec(2.5, 60, 6)]


def test_length_csv_gets_seeded_arrivals(tmp_path):
    text = (
        "num_prefill_tokens,num_decode_tokens,num_total_tokens,pd_ratio\n30,5,35,6.0\n40,8,48,5.0\n"
    )
    file = _write(tmp_path / "lengths.csv", text)
    specs = read_length_csv(file, rate_per_s=2.0, seed=3)
    assert [(s.num_prompt_tokens, s.num_output_tokens) for s in specs] == [(30, 5), (40, 8)]
    assert [s.arrival_s for s in specs] == poisson_arrivals(2.0, 2, 3).tolist()
    bursty = read_length_csv(file, rate_per_s=2.0, cv=3.0, seed=3)
    assert [s.arrival_s for s in bursty] == gamma_arrivals(2.0, 3.0, 2, seed=3).tolist()


@pytest.mark.parametrize(
    ("name", "text", "match"),
    [
        ("empty.csv", "", r"empty\.csv is empty"),
        ("header.csv", "TIMESTAMP,ContextTokens,GeneratedTokens\n", "header but no rows"),
        ("column.csv", "TIMESTAMP,ContextTokens\n1,2\n", r"column\.csv: no column 'GeneratedTokens'"),
        ("word.csv", "TIMESTAMP,ContextTokens,GeneratedTokens\n1,2,3\n2,abc,3\n", r"word\.csv:3: ContextTokens 'abc' is not a number"),
        ("neg.csv", "TIMESTAMP,ContextTokens,GeneratedTokens\n1,2,-3\n", r"neg\.csv:2: GeneratedTokens is negative"),
        ("frac.csv", "TIMESTAMP,ContextTokens,GeneratedTokens\n1,2.5,3\n", r"frac\.csv:2: ContextTokens '2\.5' is not a whole number"),
        ("time.csv", "TIMESTAMP,ContextTokens,GeneratedTokens\nyesterday,2,3\n", r"time\.csv:2: TIMESTAMP 'yesterday'"),
        ("nan.csv", "TIMESTAMP,ContextTokens,GeneratedTokens\nnan,2,3\n", r"nan\.csv:2: TIMESTAMP 'nan' is not a date-time or number"),
        ("blank.csv", "TIMESTAMP,ContextTokens,GeneratedTokens\n1,,3\n", r"blank\.csv:2: ContextTokens is missing"),
    ],
)  # fmt: skip
def test_bad_azure_files(tmp_path, name, text, match):
    with pytest.raises(WorkloadError, match=match):
        read_azure_csv(_write(tmp_path / name, text))


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("", "is empty"),
        ('{"timestamp": 1, "input_length": 2}\n', r":1: no field 'output_length'"),
        ('{"timestamp": 1, "input_length": 2, "output_length": 3}\n{oops\n', r":2: not valid JSON"),
        ("[1, 2, 3]\n", r":1: expected a JSON object"),
        ('{"timestamp": "soon", "input_length": 2, "output_length": 3}\n', "timestamp 'soon' is not a number"),
        ('{"timestamp": 1, "input_length": -2, "output_length": 3}\n', "input_length is negative"),
        ('{"timestamp": 1, "input_length": null, "output_length": 3}\n', "input_length None is not a number"),
        ('{"timestamp": NaN, "input_length": 1, "output_length": 3}\n', "timestamp is nan, not a finite number"),
    ],
)  # fmt: skip
def test_bad_mooncake_files(tmp_path, text, match):
    with pytest.raises(WorkloadError, match=match):
        read_mooncake_jsonl(_write(tmp_path / "m.jsonl", text))


def test_missing_files_are_named(tmp_path):
    missing = tmp_path / "nope.csv"
    for read in (read_azure_csv, read_mooncake_jsonl):
        with pytest.raises(WorkloadError, match=r"workload file .*nope\.csv not found"):
            read(missing)
    with pytest.raises(WorkloadError, match=r"no column 'num_decode_tokens'"):
        read_length_csv(_write(tmp_path / "l.csv", "num_prefill_tokens\n3\n"), rate_per_s=1, seed=0)


def test_resolve_path(tmp_path, monkeypatch):
    monkeypatch.delenv("EETB_DATA_DIR", raising=False)
    file = _write(tmp_path / "t.csv", AZURE_TEXT)
    assert resolve_path(file) == file
    assert resolve_path("t.csv", tmp_path) == tmp_path / "t.csv"
    with pytest.raises(WorkloadError, match=r"other\.csv not found or under"):
        resolve_path("other.csv", tmp_path)
    with pytest.raises(WorkloadError, match="EETB_DATA_DIR"):
        resolve_path("other.csv")


@pytest.mark.skipif(not os.environ.get("EETB_DATA_DIR"), reason="EETB_DATA_DIR not set")
def test_real_azure_trace():
    specs = read_azure_csv(Path(os.environ["EETB_DATA_DIR"]) / AZURE_FILE)
    assert len(specs) == 19_366
    arrivals_s = np.array([s.arrival_s for s in specs])
    assert arrivals_s[0] == 0.0 and np.all(np.diff(arrivals_s) >= 0)
    assert 3000 < arrivals_s[-1] < 3700  # one real hour, 18:15:46 to 19:14:08
    assert specs[0] == LengthSpec(0.0, 374, 44)


# ---- transforms --------------------------------------------------------------------------------


def _specs(arrivals_s: list[float]) -> list[LengthSpec]:
    return [LengthSpec(t, 10, 5) for t in arrivals_s]


def test_time_scale_and_rescale_rate():
    specs = _specs([0.0, 1.0, 3.0, 4.0])
    assert [s.arrival_s for s in time_scale(specs, 0.5)] == [0.0, 0.5, 1.5, 2.0]
    assert mean_rate_per_s(specs) == pytest.approx(0.75)
    faster = rescale_rate(specs, 3.0)
    assert mean_rate_per_s(faster) == pytest.approx(3.0)
    assert [s.arrival_s for s in faster] == pytest.approx([0.0, 0.25, 0.75, 1.0])
    with pytest.raises(WorkloadError, match="time scale"):
        time_scale(specs, 0.0)
    with pytest.raises(WorkloadError, match="at least two"):
        rescale_rate(specs[:1], 1.0)
    with pytest.raises(WorkloadError, match="at once"):
        rescale_rate(_specs([2.0, 2.0]), 1.0)


def test_take():
    specs = _specs([0.0, 1.0, 2.0])
    assert take(specs, 2) == specs[:2]
    with pytest.raises(WorkloadError, match="asked for 4 requests but the trace has 3"):
        take(specs, 4)


def test_clip_lengths_counts():
    specs = [
        LengthSpec(0.0, 100, 10),  # fits
        LengthSpec(1.0, 5000, 10),  # prompt over max_prompt_tokens
        LengthSpec(2.0, 900, 500),  # output over max_output_tokens and over the model length
        LengthSpec(3.0, 0, 0),  # both raised to one token
    ]
    clipped, report = clip_lengths(
        specs, max_prompt_tokens=1000, max_output_tokens=200, max_model_len=1024
    )
    assert [(s.num_prompt_tokens, s.num_output_tokens) for s in clipped] == [
        (100, 10),
        (1000, 10),
        (900, 124),
        (1, 1),
    ]
    assert report == ClipReport(
        num_requests=4, num_prompts_clipped=2, num_outputs_clipped=2, num_requests_clipped=3
    )
    assert all(s.num_prompt_tokens + s.num_output_tokens <= 1024 for s in clipped)
    # with only the model length, a prompt keeps room for one output token
    only_len, report = clip_lengths([LengthSpec(0.0, 2000, 50)], max_model_len=1024)
    assert only_len == [LengthSpec(0.0, 1023, 1)] and report.num_requests_clipped == 1
    with pytest.raises(WorkloadError, match="max_model_len"):
        clip_lengths(specs, max_model_len=1)


# ---- prompts -----------------------------------------------------------------------------------


def _encode(text: str) -> list[int]:
    return [ord(c) for c in text]


TEXTS = ["a" * 50, "b" * 200, "c" * 20, "d" * 120]


def test_attach_prompts_exact_and_deterministic():
    specs = [LengthSpec(float(i), n, 7) for i, n in enumerate([10, 150, 40, 100, 30, 200])]
    requests = attach_prompts(specs, TEXTS, _encode, seed=0)
    assert [len(r.prompt_token_ids) for r in requests] == [s.num_prompt_tokens for s in specs]
    assert [r.max_tokens for r in requests] == [7] * len(specs)
    assert [r.request_id for r in requests] == list(range(len(specs)))
    for r in requests:  # a single long-enough text, cut
        assert set(r.prompt_token_ids) == {ord(TEXTS[r.source_index][0])}
    assert attach_prompts(specs, TEXTS, _encode, seed=0) == requests
    others = [attach_prompts(specs, TEXTS, _encode, seed=s) for s in range(1, 6)]
    assert any(o != requests for o in others)


def test_attach_prompts_joins_texts_when_none_is_long_enough():
    (request,) = attach_prompts([LengthSpec(0.0, 300, 1)], TEXTS, _encode, seed=0)
    assert len(request.prompt_token_ids) == 300
    assert len(set(request.prompt_token_ids)) > 1
    with pytest.raises(WorkloadError, match="zero tokens"):
        attach_prompts([LengthSpec(0.0, 3, 1)], ["", ""], _encode, seed=0)
    with pytest.raises(WorkloadError, match="no texts"):
        attach_prompts([LengthSpec(0.0, 3, 1)], [], _encode, seed=0)
    with pytest.raises(WorkloadError, match="clip_lengths"):
        attach_prompts([LengthSpec(0.0, 0, 1)], TEXTS, _encode, seed=0)


def test_synthetic_prompts():
    specs = [LengthSpec(0.0, 64, 4), LengthSpec(0.5, 3, 2)]
    requests = synthetic_prompts(specs, vocab_size=10, seed=0)
    assert [len(r.prompt_token_ids) for r in requests] == [64, 3]
    assert all(3 <= t < 10 for r in requests for t in r.prompt_token_ids)
    assert all(r.source_index is None for r in requests)
    assert synthetic_prompts(specs, 10, 0) == requests
    assert synthetic_prompts(specs, 10, 1) != requests


# ---- workload strings --------------------------------------------------------------------------


def test_parse_good_workloads():
    assert parse_workload("poisson:rate=2,n=64,prompt=128,output=64") == WorkloadSpec(
        "poisson", num_requests=64, rate_per_s=2.0, prompt_tokens=(128, 128), output_tokens=(64, 64)
    )
    gamma = parse_workload(" Gamma: rate=0.5, cv=3, n=8, prompt=64-512 ")
    assert (gamma.kind, gamma.cv, gamma.prompt_tokens, gamma.output_tokens) == (
        "gamma",
        3.0,
        (64, 512),
        (64, 64),
    )
    azure = parse_workload("azure:path=traces/a.csv,n=200,scale=0.1")
    assert (azure.path, azure.num_requests, azure.time_scale) == ("traces/a.csv", 200, 0.1)
    assert parse_workload("mooncake:path=m.jsonl,n=100").prompt_tokens is None
    lengths = parse_workload("lengths:path=l.csv,rate=2,cv=1,n=100")
    assert (lengths.rate_per_s, lengths.cv, lengths.num_requests) == (2.0, 1.0, 100)


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("uniform:rate=2", r"unknown workload kind 'uniform' \(known: poisson, gamma, azure, mooncake, lengths\)"),
        ("poisson:rate=2,n=4,burst=3", r"unknown argument 'burst' \(known: rate, n, prompt, output, eos\)"),
        ("poisson:rate=2,n=4,eos=maybe", r"bad eos='maybe' \(expected one of stop, ignore\)"),
        ("poisson:rate=2,n", r"malformed argument 'n' \(expected KEY=VALUE\)"),
        ("poisson:rate=fast,n=4", r"bad rate='fast'"),
        ("poisson:rate=-1,n=4", r"bad rate='-1' \(expected a positive number\)"),
        ("poisson:rate=1,n=2.5", r"bad n='2.5' \(expected a whole number"),
        ("poisson:rate=1,n=4,prompt=512-64", r"bad prompt='512-64' \(range LOW-HIGH"),
        ("poisson:rate=1", r"poisson workload needs n="),
        ("gamma:rate=1,n=3", r"gamma workload needs cv="),
        ("poisson:rate=1,rate=2,n=3", r"argument 'rate' given twice"),
        ("azure:n=3", r"azure workload needs path="),
        ("azure:path=a.csv,scale=2,rate=1", r"give scale= or rate=, not both"),
        ("lengths:path=l.csv", r"lengths workload needs rate="),
    ],
)  # fmt: skip
def test_parse_bad_workloads(text, match):
    with pytest.raises(WorkloadError, match=match):
        parse_workload(text)


def test_eos_rule_defaults_to_stop_for_synthetic_and_ignore_for_trace_replays(tmp_path):
    # a trace's output lengths are what its users got; a summary prompt's are a cap
    assert not parse_workload("poisson:rate=2,n=4").ignore_eos
    assert parse_workload("poisson:rate=2,n=4,eos=ignore").ignore_eos
    assert parse_workload("azure:path=a.csv").ignore_eos
    assert not parse_workload("azure:path=a.csv,eos=stop").ignore_eos
    azure = _write(tmp_path / "azure.csv", AZURE_TEXT)
    for text, expected in (
        (f"azure:path={azure}", True),
        (f"azure:path={azure},eos=stop", False),
        ("poisson:rate=2,n=3", False),
        ("gamma:rate=2,cv=2,n=3,eos=ignore", True),
    ):
        specs, _ = workload_lengths(text, seed=0, max_model_len=8)  # clipping keeps the rule
        assert {s.ignore_eos for s in specs} == {expected}, text
        requests = synthetic_prompts(specs, 50, seed=0)
        assert {r.ignore_eos for r in requests} == {expected}, text


def test_build_synthetic_lengths():
    spec = parse_workload("poisson:rate=2,n=300,prompt=64-512,output=16")
    specs = build_lengths(spec, seed=5)
    assert [s.arrival_s for s in specs] == poisson_arrivals(2.0, 300, 5).tolist()
    prompts = [s.num_prompt_tokens for s in specs]
    assert min(prompts) >= 64 and max(prompts) <= 512 and len(set(prompts)) > 50
    assert {s.num_output_tokens for s in specs} == {16}
    assert build_lengths(spec, seed=5) == specs != build_lengths(spec, seed=6)
    gamma = build_lengths(parse_workload("gamma:rate=2,cv=3,n=20"), seed=5)
    assert [s.arrival_s for s in gamma] == gamma_arrivals(2.0, 3.0, 20, seed=5).tolist()


def test_build_trace_lengths(tmp_path):
    azure = _write(tmp_path / "azure.csv", AZURE_TEXT)
    specs = build_lengths(parse_workload(f"azure:path={azure},n=2,scale=0.5"), seed=0)
    assert [s.arrival_s for s in specs] == pytest.approx([0.0, 4.314579 / 2])
    rated = build_lengths(parse_workload(f"azure:path={azure},rate=1"), seed=0)
    assert mean_rate_per_s(rated) == pytest.approx(1.0)
    lengths = _write(tmp_path / "l.csv", "num_prefill_tokens,num_decode_tokens\n1,2\n3,4\n5,6")
    specs = build_lengths(parse_workload(f"lengths:path={lengths},rate=2,n=2"), seed=1)
    assert [(s.num_prompt_tokens, s.num_output_tokens) for s in specs] == [(1, 2), (3, 4)]
    assert [s.arrival_s for s in specs] == poisson_arrivals(2.0, 3, 1).tolist()[:2]
    with pytest.raises(WorkloadError, match="asked for 9 requests"):
        build_lengths(parse_workload(f"azure:path={azure},n=9"), seed=0)
