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


def test_a_probes_share_counts_only_the_bulk_jobs_still_waiting_when_it_arrived_that_started_before_it() -> None:
    from inferq.benchmarks.priority import _figures

    # Bulk jobs started at t = 1..10; the probe was sent at 4.5 and started at 6.5: of the six still
    # waiting (5..10), two (5, 6) went first. Those started before it was sent do not count.
    probe = {"sent": 4.5, "started": 6.5, "answered": 7.0}
    figures = _figures([probe], [float(t) for t in range(1, 11)])
    assert figures["probes"] == [{"wait_ms": 2000.0, "answer_ms": 2500.0, "waiting": 6, "ahead": 2, "ahead_pct": 33.33}]
    assert (figures["ahead_pct_max"], figures["waiting_min"], figures["backlog_seconds"]) == (33.33, 6, 9.0)
