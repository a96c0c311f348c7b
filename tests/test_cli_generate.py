"""``eetb generate`` on the built-in model, and its bad input: one line, exit code 2."""

from __future__ import annotations

import json
import os

import pytest

from testbed.cli import main


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(["generate", *argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_generate_early_exit_json(capsys):
    code, out, _ = _run(
        capsys, "--prompt", "The court said on Tuesday that", "--max-tokens", "6",
        "--batching", "shrink", "--rule", "hidden", "--threshold", "0.9", "--json",
    )  # fmt: skip
    assert code == 0
    record = json.loads(out.splitlines()[0])
    assert 1 <= len(record["token_ids"]) <= 6
    assert len(record["exit_layers"]) == len(record["token_ids"])
    assert all(1 <= e <= 8 for e in record["exit_layers"])
    assert record["exit_layers"][0] == 8, "the first token comes from the full-depth prefill"


@pytest.mark.skipif(not os.environ.get("EETB_DATA_DIR"), reason="EETB_DATA_DIR not set")
def test_generate_from_data(capsys):
    code, out, _ = _run(capsys, "--prompts-from-data", "2", "--max-tokens", "4")
    assert code == 0
    assert out.count("--- ") == 2


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--batching", "nope"], "unknown batching policy 'nope' (known:"),
        (["--rule", "softmax", "--threshold", "1.5"], "1.5"),
        (["--fill", "nope"], "unknown KV-fill policy 'nope'"),
        (["--max-tokens", "0"], "max_tokens must be positive"),
        (["--batching", "quorum", "--batching-param", "fraction"], "is not KEY=VALUE"),
        (["--model", "/nonexistent/ckpt"], "checkpoint directory not found"),
    ],
)
def test_generate_bad_input(capsys, argv, message):
    code, _, err = _run(capsys, "--prompt", "hello", *argv)
    assert code == 2
    assert err.count("\n") == 1 and message in err
    assert "Traceback" not in err


def test_prompt_longer_than_context(capsys):
    code, _, err = _run(capsys, "--prompt", "word " * 3000, "--max-tokens", "4")
    assert code == 2
    assert err.count("\n") == 1 and "max_model_len" in err


def test_capture_and_trace_info(capsys, tmp_path):
    out = tmp_path / "cap"
    code = main(["capture", "--workload", "poisson:rate=50,n=3,prompt=8-16,output=4",
                 "--dataset", "synthetic", "--mode", "oracle", "--out", str(out)])  # fmt: skip
    assert code == 0
    assert "signals at layers 1-8 (all)" in capsys.readouterr().out
    assert main(["trace", "info", str(out), "--threshold", "0.9"]) == 0
    text = capsys.readouterr().out
    assert "requests 3, tokens 12" in text
    assert "agreement with the final token by exit layer" in text
    # a second capture to the same folder is refused and the first one survives
    again = [
        "capture",
        "--workload",
        "poisson:rate=5,n=2",
        "--dataset",
        "synthetic",
        "--out",
        str(out),
    ]
    assert main(again) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["trace", "info", str(out)]) == 0


def test_an_oracle_of_chosen_exit_points_and_its_trace_info(capsys, tmp_path):
    out = tmp_path / "cap"
    code = main(["capture", "--workload", "poisson:rate=50,n=3,prompt=8-16,output=4",
                 "--dataset", "synthetic", "--mode", "oracle", "--out", str(out),
                 "--min-exit-layer", "4", "--exit-stride", "2"])  # fmt: skip
    assert code == 0
    assert "mode oracle, engine native, signals at layers 4, 6, 8)" in capsys.readouterr().out
    assert main(["trace", "info", str(out)]) == 0  # the capture's own exit points by default
    text = capsys.readouterr().out
    assert "(exit points 4, 6)" in text
    agreement = text.split("agreement with the final token by exit layer:\n")[1].splitlines()[0]
    assert [cell.split(":")[0] for cell in agreement.split()[::2]] == ["4", "6", "8"]
    assert main(["trace", "info", str(out), "--min-exit-layer", "3"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "only at layers 4, 6, not at 3, 5, 7" in err
    grid = tmp_path / "grid.toml"
    grid.write_text(f"""trace = "{out}"
workloads = ["poisson:rate=5,n=4,prompt=8,output=4"]
cost_models = ["roofline:H100"]
[[policies]]
batching = "shrink"
rules = ["hidden"]
thresholds = [0.9]
min_exit_layer = 4
exit_stride = 1
""")
    assert main(["sweep", str(grid), "--out", str(tmp_path / "sweep")]) == 2  # before any run
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "shrink/hidden@0.9≥4/copy" in err and "not at 5, 7" in err
    assert not (tmp_path / "sweep").exists()
    assert main(["capture", "--workload", "poisson:rate=50,n=2,prompt=8,output=2",
                 "--dataset", "synthetic", "--out", str(tmp_path / "deep"),
                 "--min-exit-layer", "8"]) == 2  # fmt: skip
    assert "leaves no exit point" in capsys.readouterr().err
    assert not (tmp_path / "deep").exists()


@pytest.mark.parametrize(
    "argv,message",
    [
        (["capture", "--workload", "nope:x=1", "--out", "X"], "unknown workload kind 'nope'"),
        (["capture", "--workload", "poisson:rate=-1,n=2", "--out", "X"], "rate"),
        (
            [
                "capture",
                "--workload",
                "poisson:rate=1,n=2",
                "--mode",
                "oracle",
                "--dataset",
                "synthetic",
                "--rule",
                "nope",
                "--out",
                "X",
            ],
            "unknown exit rule 'nope'",
        ),  # fmt: skip
        (["trace", "info", "/nonexistent"], "meta.json is missing"),
    ],
)
def test_capture_bad_input(capsys, tmp_path, monkeypatch, argv, message):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err
    assert not (tmp_path / "X").exists()
