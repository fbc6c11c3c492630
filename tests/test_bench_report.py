"""The bench's report rules: which systems its table shows, and the edge process counts it takes."""

from __future__ import annotations

import pytest

from inferq.benchmarks.harness import _counts
from inferq.benchmarks.report import SYSTEMS, summarize, systems_of


def _phase(jobs_per_s: float) -> dict:
    return {"jobs_per_s": jobs_per_s, "spread": {"jobs_per_s": {"median": jobs_per_s, "min": jobs_per_s,
                                                                "max": jobs_per_s, "n": 1}}}


def test_each_further_edge_process_count_gets_a_row_right_after_inferq_http() -> None:
    phases = {"inferq_http_load": _phase(200.0), "inferq_http_e2_load": _phase(300.0), "inferq_http_e2_low": {},
              "celery_load": _phase(100.0)}
    assert [p for p, _ in systems_of(phases)][:3] == ["inferq_http", "inferq_http_e2", "inferq_amqp"]
    assert systems_of({"inferq_http_load": _phase(1.0)}) == list(SYSTEMS), "no extra row without the phases"
    rows = summarize({"phases": phases})["systems"]
    assert rows["inferq_http_e2"]["jobs_per_s"]["median"] == 300.0 and rows["inferq_http_e2"]["http_over_it"] is None
    assert rows["celery"]["http_over_it"] == 2.0


@pytest.mark.parametrize("text, counts", [("1", [1]), ("1,2", [1, 2]), (" 2, 1 ", [2, 1])])
def test_edge_process_counts_are_read_in_order(text: str, counts: list[int]) -> None:
    assert _counts(text) == counts


@pytest.mark.parametrize("text", ["", "0", "1,1", "two", "1,-2"])
def test_a_bad_edge_process_count_is_refused_with_a_clear_message(text: str) -> None:
    with pytest.raises(SystemExit, match="--edge-processes"):
        _counts(text)
