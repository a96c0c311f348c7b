"""The validation bench's workloads: the saturated load follows the measured capacity."""

from __future__ import annotations

from testbed.bench.validation import WORKLOAD_NAMES, recorded_capacity, workloads
from testbed.cli import main as cli
from testbed.runinfo import write_run_info
from testbed.workload.spec import parse_workload


def test_saturated_load_is_ninety_percent_of_the_measured_capacity():
    chosen = {name: (workload, calibration) for name, workload, calibration in workloads(1200.0)}
    assert tuple(chosen) == WORKLOAD_NAMES
    workload, calibration = chosen["poisson-saturated"]
    # 0.9 · 1200 tokens/s over 48 tokens a request
    assert "rate=22.5," in workload and "rate=22.5," in calibration
    assert "rate=11.2," in workloads(600.0)[1][1]  # a machine half as fast: half the rate
    parse_workload(workload)  # a workload string the rest of the testbed accepts


def test_an_unknown_workload_is_refused_before_any_run(tmp_path, capsys):
    code = cli(["bench", "--suite", "validation", "--workloads", "demo,nope",
                "--out", str(tmp_path / "b")])  # fmt: skip
    assert code == 2
    assert "unknown validation workload(s) nope" in capsys.readouterr().err
    assert not (tmp_path / "b" / "capacity").exists()


def test_a_rerun_reuses_the_capacity_of_a_finished_burst(tmp_path):
    # the rerun must rebuild the same workloads, or its validations would not find their runs
    assert recorded_capacity(tmp_path) is None
    write_run_info(tmp_path, {"capacity_tokens_per_s": 901.5, "workloads": []}, seed=0)
    assert recorded_capacity(tmp_path) is None  # the burst run never finished
    (tmp_path / "capacity").mkdir()
    (tmp_path / "capacity" / "meta.json").write_text("{}")
    assert recorded_capacity(tmp_path) == 901.5


def test_a_rerun_into_another_models_folder_is_refused(tmp_path, capsys):
    """Its runs would be reused as this model's: one clear line, exit 2, nothing removed."""
    write_run_info(tmp_path, {"capacity_tokens_per_s": 901.5, "model": "smollm2-135m"}, seed=0)
    (tmp_path / "capacity").mkdir()
    (tmp_path / "capacity" / "meta.json").write_text("{}")
    assert recorded_capacity(tmp_path, "smollm2-135m") == 901.5
    code = cli(["bench", "--suite", "validation", "--out", str(tmp_path)])  # the built-in model
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "holds the validation bench of model 'smollm2-135m'" in err[0]
    assert (tmp_path / "capacity" / "meta.json").is_file()


def test_num_requests_sets_every_streams_length_at_the_same_rates():
    """A slower model validates shorter streams: each workload and its calibration have N
    requests, at the default's arrival rates."""
    default = {name: (w, c) for name, w, c in workloads(1200.0)}
    short = {name: (w, c) for name, w, c in workloads(1200.0, num_requests=16)}
    for name in WORKLOAD_NAMES:
        for ours, theirs in zip(short[name], default[name], strict=True):
            ours_spec, theirs_spec = parse_workload(ours), parse_workload(theirs)
            assert ours_spec.num_requests == 16
            assert ours_spec.rate_per_s == theirs_spec.rate_per_s
    assert "rate=24," in short["demo"][0]


def test_eos_ignore_runs_every_request_to_its_output_length(tmp_path, capsys):
    """--eos ignore: every workload and calibration stream runs to its output length; a rerun
    into a folder of the other rule is refused with one line, nothing removed."""
    for _, workload, calibration in workloads(1200.0, num_requests=16, eos="ignore"):
        assert parse_workload(workload).ignore_eos and parse_workload(calibration).ignore_eos
    # by default only the trace replay runs to its recorded lengths
    assert [parse_workload(w).ignore_eos for _, w, _ in workloads(1200.0)] == [False, False, True]
    write_run_info(tmp_path, {"capacity_tokens_per_s": 901.5}, seed=0)  # run before --eos
    (tmp_path / "capacity").mkdir()
    (tmp_path / "capacity" / "meta.json").write_text("{}")
    code = cli(["bench", "--suite", "validation", "--eos", "ignore", "--out", str(tmp_path)])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "run with eos=stop, not eos=ignore" in err[0]
    assert (tmp_path / "capacity" / "meta.json").is_file()
