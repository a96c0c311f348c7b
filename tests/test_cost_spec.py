"""Cost-model specs: parsed once, written back equal, bad text refused with the forms."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from analysis.report import short_cost_model
from testbed.cost_spec import CostModelError, CostModelSpec, FitSource

paths = st.from_regex(r"[a-z][a-z0-9_/.]{0,12}", fullmatch=True).filter(lambda p: "+" not in p)
factors = st.sampled_from([1.0, 0.5, 1.25, 2.0, 0.98765])


@given(st.lists(st.tuples(paths, factors), min_size=1, max_size=5), factors)
def test_a_fitted_spec_reads_back_equal(parts, factor):
    spec = CostModelSpec("fitted", sources=tuple(FitSource(p, f) for p, f in parts),
                         time_factor=factor)  # fmt: skip
    assert CostModelSpec.parse(str(spec)) == spec


def test_the_text_forms():
    assert CostModelSpec.parse("roofline:H100:llama-2-7b") == CostModelSpec(
        "roofline", "H100", "llama-2-7b"
    )
    assert CostModelSpec.parse("1.5*roofline:h200") == CostModelSpec(
        "roofline", "h200", time_factor=1.5
    )
    fitted = CostModelSpec.parse("fitted:0.9*a/cap+b/steps.parquet")
    assert fitted.sources == (FitSource("a/cap", 0.9), FitSource("b/steps.parquet"))
    # a profile's MODEL is the part after the last ':' unless that is still the path
    assert CostModelSpec.parse("profile:x/y.csv:llama-2-7b").model == "llama-2-7b"
    assert CostModelSpec.parse("profile:odd:dir/y.csv") == CostModelSpec("profile", "odd:dir/y.csv")
    assert str(CostModelSpec.parse("Roofline:H100")) == "roofline:H100"


def test_scaling_composes_and_unscaled_drops_it():
    spec = CostModelSpec.parse("roofline:H100").scaled(2.0).scaled(1.5)
    assert spec.time_factor == 3.0 and str(spec) == "3.00000*roofline:H100"
    assert str(spec.unscaled()) == "roofline:H100"


@pytest.mark.parametrize(("text", "message"), [
    ("magic:1", "unknown cost model"), ("roofline", "lacks its argument"),
    ("0*roofline:H100", "must be finite and > 0"), ("fitted:", "lacks its argument"),
])  # fmt: skip
def test_bad_specs_are_refused_with_the_forms(text, message):
    with pytest.raises(CostModelError, match=message):
        CostModelSpec.parse(text)


def test_a_fit_over_many_captures_is_shortened_for_tables():
    spec = "fitted:" + "+".join(f"1.01000*out/calibration/p{i}/r0" for i in range(4))
    assert short_cost_model(spec) == "fitted on 4 calibration captures under out/calibration"
    assert short_cost_model("fitted:a+b") == "fitted:a+b"
    assert short_cost_model("not a spec") == "not a spec"
