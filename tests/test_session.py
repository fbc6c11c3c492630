"""ModelSession's hot path: tiny models run on the loop once their run time is known, slow ones in the session thread."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from inferq.errors import InferenceError
from inferq.runtime.repository import load_model
from inferq.runtime.session import InlineRule, ModelSession, feed_rows
from inferq.runtime.warmup import warm_up
from inferq.settings import Settings


def test_the_rule_never_inlines_before_a_time_is_known() -> None:
    rule = InlineRule(0.2e-3)
    assert not rule.inline(1)
    rule.observe(5e-6, 1)  # the warm-up run: dropped
    assert rule.per_row_s is None and not rule.inline(1)


def test_the_rule_inlines_runs_predicted_below_the_threshold_once_warmed_up() -> None:
    rule = InlineRule(0.2e-3)
    rule.observe(50e-3, 1)  # a slow warm-up does not count
    rule.observe(10e-6, 1)
    assert rule.inline(1)


def test_the_rule_predicts_a_larger_batch_from_the_time_per_row() -> None:
    rule = InlineRule(0.2e-3)
    for _ in range(3):
        rule.observe(10e-6, 1)
    assert rule.inline(16) and not rule.inline(32)  # 16 x 10 us < 0.2 ms <= 32 x 10 us


def test_the_rule_follows_a_model_that_gets_slower() -> None:
    rule = InlineRule(0.2e-3, alpha=0.5)
    for _ in range(3):
        rule.observe(10e-6, 1)
    rule.observe(2e-3, 1)
    assert not rule.inline(1)


def test_a_threshold_of_zero_never_inlines() -> None:
    rule = InlineRule(0.0)
    for _ in range(3):
        rule.observe(1e-6, 1)
    assert not rule.inline(1)


def test_the_rows_of_a_feed_are_the_first_dim_of_its_first_input() -> None:
    assert feed_rows({"x": np.zeros((7, 256), np.float32)}) == 7
    assert feed_rows({"x": np.zeros((), np.float32)}) == 1
    assert feed_rows({}) == 1


async def open_session(settings: Settings, model: str, **config: object) -> tuple[ModelSession, object]:
    entry = load_model(settings.model_repository, model)
    version = entry.version(None)
    return await ModelSession.open(version, dataclasses.replace(entry.config, **config)), version


async def test_a_tiny_models_runs_are_inline_after_the_warm_up(settings: Settings) -> None:
    session, version = await open_session(settings, "mlp")
    async with session:
        assert (await warm_up(session, version)).error == ""
        assert session.inline_runs == 0  # the warm-up went to the thread
        x = np.random.default_rng(0).standard_normal((1, 256)).astype(np.float32)
        outputs = [next(iter((await session.run({"x": x})).values())) for _ in range(5)]
    assert session.inline_runs >= 3  # the first run after the warm-up may still take the thread
    assert all(np.array_equal(o, outputs[0]) for o in outputs)


async def test_a_slow_models_runs_stay_in_the_session_thread(settings: Settings) -> None:
    session, version = await open_session(settings, "slow")
    async with session:
        await warm_up(session, version)
        x = np.zeros((1, 256), np.float32)
        for _ in range(3):
            await session.run({"x": x}, None, 30.0)
    assert session.inline_runs == 0 and session.rule.per_row_s > 0.2e-3


async def test_a_model_configured_with_no_inline_threshold_always_takes_the_thread(settings: Settings) -> None:
    session, version = await open_session(settings, "mlp", inline_run_ms=0.0)
    async with session:
        await warm_up(session, version)
        for _ in range(5):
            await session.run({"x": np.zeros((1, 256), np.float32)})
    assert session.inline_runs == 0


async def test_a_run_in_the_session_thread_past_its_timeout_is_stopped_and_fails(settings: Settings) -> None:
    session, version = await open_session(settings, "slow")
    async with session:
        await warm_up(session, version)
        with pytest.raises(InferenceError, match="did not finish within 0.01s"):
            await session.run({"x": np.zeros((256, 256), np.float32)}, None, 0.01)
        assert not session.wedged and session.inline_runs == 0


def write_fixed_output_model(root, name: str) -> None:
    """x float32[N,4] -> y declared float32[N,2], but always a constant [3,2]: a signature that lies about its batch."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph(
        [helper.make_node("Identity", ["c"], ["y"])], name,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 2])],
        [numpy_helper.from_array(np.arange(6, dtype=np.float32).reshape(3, 2), "c")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    (root / name / "1").mkdir(parents=True)
    onnx.save(model, str(root / name / "1" / "model.onnx"))


async def test_an_output_that_breaks_its_declared_batch_dim_at_load_makes_the_model_run_one_job_at_a_time(tmp_path) -> None:
    from inferq.actors.planner import plan
    from inferq.broker.messages import JobRequest
    from inferq.runtime.signature import is_batchable

    write_fixed_output_model(tmp_path, "liar")
    entry = load_model(tmp_path, "liar")
    declared = entry.version(None)
    assert is_batchable(declared)
    async with await ModelSession.open(declared, entry.config) as session:
        warmed = await warm_up(session, declared)
    assert warmed.error == "" and not is_batchable(warmed.version)
    jobs = [(i, JobRequest(f"j{i}", {"x": np.zeros((1, 4), np.float32)})) for i in range(3)]
    groups, rejected = plan(jobs, warmed.version, allow_nan=True)
    assert not rejected and [len(g.requests) for g in groups] == [1, 1, 1]


async def test_a_model_true_to_its_batch_dim_keeps_its_signature_after_the_warm_up(settings: Settings) -> None:
    session, version = await open_session(settings, "mlp")
    async with session:
        assert (await warm_up(session, version)).version == version
