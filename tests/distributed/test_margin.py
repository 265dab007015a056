"""The tolerance of the cross-configuration tests sits far from rounding and far from a defect:
tests/margin.py's jobs in float64 differ from one process by far less than helpers.EXACT, and a
removed gradient average differs by far more (tests/README.md has the figures)."""

import pytest

from tests import margin

pytestmark = pytest.mark.distributed


def test_exact_is_100x_from_rounding_and_from_a_removed_gradient_average(tmp_path):
    rows = margin.measure(tmp_path)
    configurations = {configuration for _, configuration, _ in rows}
    assert {"2 ranks, ddp", "3 ranks, fsdp", "2 ranks, ddp, no all-reduce (defect)"} <= configurations
    assert margin.problems(rows) == [], rows
    # The check can fail: a defect-sized difference in an ordinary job, or a defect nobody sees.
    assert margin.problems([("gpt, AdamW", "2 ranks, ddp", 1e-6)])
    assert margin.problems([("regression, SGD", "2 ranks, ddp, summed (defect)", 1e-9)])
