"""The registry's rules without processes: validation, routing, gates, holds, plans, auto-rollback, byte ranges."""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path

import pytest
from aiohttp import web

from inferq.actors.rollback import OutcomeWindow, armed, decide
from inferq.broker.messages import FAILED, SUCCEEDED, JobEvent
from inferq.edge.artifacts import parse_range
from inferq.errors import Conflict, IntegrityError, InvalidInput, ModelUnavailable, UnknownModel
from inferq.runtime.artifacts import FilesystemStore, fetch
from inferq.runtime.records import AliasRecord, ModelRecord, RollbackRule, ShadowRecord, VersionRecord
from inferq.runtime.plans import (
    plan_alias, plan_auto_rollback, plan_register, plan_release, plan_remove_model, plan_remove_version, plan_rollback,
    plan_shadow, plan_traffic,
)
from inferq.runtime.repository import TensorSpec
from inferq.runtime.routing import (
    STABLE, WindowStats, breach, bucket, check_alias, choose, mirror, parse_rule, parse_weights, split, worker_floors,
)

X = (TensorSpec("x", "float32", (None, 256)),)
Y = (TensorSpec("probs", "float32", (None, 10)),)
OTHER = (TensorSpec("logits", "float32", (None, 10)),)


def version(sha: str, outputs: tuple[TensorSpec, ...] = Y) -> VersionRecord:
    return VersionRecord(X, outputs, sha256=sha * 64, size=100)


def model(**fields) -> ModelRecord:
    base = ModelRecord("m", "1", {"1": version("a"), "2": version("b")}, aliases={STABLE: AliasRecord("1")})
    return replace(base, **fields)


def apply(plan, record: ModelRecord | None, now: float = 1000.0):
    return plan(record, now)


# --- names, weights, rules ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["stable", "canary", "a", "blue-2", "x" * 32])
def test_aliases_that_match_the_pattern_are_accepted(name: str) -> None:
    assert check_alias(name) == name


@pytest.mark.parametrize("name", ["", "Stable", "2nd", "-a", "a_b", "a.b", "x" * 33, "canary!"])
def test_aliases_outside_the_pattern_are_refused(name: str) -> None:
    with pytest.raises(InvalidInput, match="must match"):
        check_alias(name)


def test_traffic_weights_must_be_whole_percents_summing_to_100() -> None:
    assert parse_weights(["stable=90", "canary=10"]) == {"stable": 90, "canary": 10}
    for bad, message in ((["stable=90", "canary=5"], "sum to 100"), (["stable=90.5", "canary=9.5"], "ALIAS=PERCENT"),
                         (["stable"], "ALIAS=PERCENT"), (["stable=-10", "canary=110"], ">= 0"), (["Stable=100"], "must match")):
        with pytest.raises(InvalidInput, match=message):
            parse_weights(bad)


def test_auto_rollback_rules_parse_from_text_and_refuse_nonsense() -> None:
    rule = parse_rule("error_rate=0.05,p95_ms=200,window_s=60,min_jobs=50")
    assert rule == RollbackRule(0.05, 200.0, 60.0, 50)
    assert parse_rule({"min_jobs": 10}) == RollbackRule(min_jobs=10)
    for bad in ("error_rate=2", "window_s=0", "min_jobs=0", "speed=1", "error_rate", "p95_ms=fast", {"error_rate": float("nan")}):
        with pytest.raises(InvalidInput):
            parse_rule(bad)


# --- routing ------------------------------------------------------------------------------------------------------


def test_the_split_bucket_depends_only_on_model_and_key_and_is_uniform() -> None:
    assert bucket("m", "key-1") == bucket("m", "key-1")
    assert bucket("m", "key-1") != bucket("n", "key-1") or bucket("m", "key-2") != bucket("n", "key-2")
    halves = Counter(bucket("m", f"k{i}") < 50 for i in range(10_000))
    assert abs(halves[True] - 5000) < 200


def test_a_split_sends_each_key_to_one_alias_in_proportion() -> None:
    record = model(aliases={STABLE: AliasRecord("1"), "canary": AliasRecord("2")}, traffic={STABLE: 90, "canary": 10})
    routes = [choose(record, {"1", "2"}, f"job-{i}") for i in range(5000)]
    assert {(r.alias, r.version) for r in routes} == {(STABLE, "1"), ("canary", "2")}
    assert abs(sum(r.version == "2" for r in routes) - 500) < 100
    assert [choose(record, {"1", "2"}, f"job-{i}") for i in range(50)] == routes[:50], "the same key, the same route"


def test_pinned_routes_ignore_the_split_and_unknown_pins_are_404s() -> None:
    record = model(aliases={STABLE: AliasRecord("1"), "canary": AliasRecord("2")}, traffic={STABLE: 100, "canary": 0})
    assert choose(record, set(), "k", version="2").version == "2"
    assert choose(record, set(), "k", alias="canary").version == "2"
    with pytest.raises(UnknownModel):
        choose(record, set(), "k", version="9")
    with pytest.raises(UnknownModel):
        choose(record, set(), "k", alias="blue")


def test_a_model_without_versions_is_unavailable_with_a_reason() -> None:
    with pytest.raises(ModelUnavailable, match="no servable version"):
        choose(ModelRecord("m", "", {}), set(), "k")


def test_a_canary_that_is_not_ready_gets_no_traffic_and_its_share_goes_to_stable() -> None:
    record = model(aliases={STABLE: AliasRecord("1"), "canary": AliasRecord("2")}, traffic={STABLE: 50, "canary": 50})
    held = split(record, {"1"})
    assert held.weights == {STABLE: 100, "canary": 0}
    assert any("holds 50% at 0" in note for note in held.notes)
    assert {choose(record, {"1"}, f"k{i}").version for i in range(200)} == {"1"}
    assert split(record, {"1", "2"}).weights == {STABLE: 50, "canary": 50}
    assert {choose(record, set(), f"k{i}").version for i in range(200)} == {"1"}, "stable is never held back"


def test_an_alias_moved_to_a_version_not_yet_ready_keeps_serving_the_old_one_but_a_rollback_does_not() -> None:
    moved = apply(plan_alias("m", STABLE, "2", "me"), model()).record
    assert moved.aliases[STABLE].held_at == "1" and moved.default_version == "2"
    assert choose(moved, {"1"}, "k").version == "1", "held until version 2 is ready"
    assert choose(moved, {"1", "2"}, "k").version == "2"
    back = apply(plan_rollback("m", STABLE, "me"), moved).record
    assert back.aliases[STABLE] == replace(back.aliases[STABLE], version="1", previous="2", held_at="")
    assert choose(back, {"2"}, "k").version == "1", "a rollback goes at once, ready or not"


def test_shadow_mirrors_its_share_of_unpinned_jobs_and_never_to_the_version_that_ran() -> None:
    record = model(shadow=ShadowRecord("2", 25.0))
    chosen = [mirror(record, f"k{i}", choose(record, set(), f"k{i}")) for i in range(4000)]
    assert set(chosen) == {"2", None} and abs(chosen.count("2") - 1000) < 120
    assert mirror(model(shadow=ShadowRecord("1", 100.0)), "k", choose(model(), set(), "k")) is None


def test_worker_floors_keep_stable_at_the_policy_and_a_gated_target_at_one() -> None:
    record = model(aliases={STABLE: AliasRecord("1"), "canary": AliasRecord("2")}, traffic={STABLE: 90, "canary": 10})
    assert worker_floors(record, 0) == {"1": 0, "2": 1}
    assert worker_floors(record, 2) == {"1": 2, "2": 1}
    held = model(aliases={STABLE: AliasRecord("2", previous="1", held_at="1")})
    assert worker_floors(held, 0) == {"1": 0, "2": 1}, "the new version warms up while the old one serves"
    assert worker_floors(model(aliases={STABLE: AliasRecord("1"), "canary": AliasRecord("2")}), 1) == {"1": 1, "2": 0}


# --- plans: what the registry refuses ----------------------------------------------------------------------------


def test_the_first_push_makes_a_model_whose_first_version_is_stable() -> None:
    change = apply(plan_register("m", None, version("a"), None, "me"), None)
    assert change.record.versions["1"].created_by == "me" and change.record.aliases[STABLE].version == "1"
    assert change.result.created and change.record.default_version == "1"
    assert [e.action.value for e in change.entries] == ["push", "alias"]


def test_versions_are_immutable_identical_bytes_are_a_no_op_and_numbers_are_never_reused() -> None:
    record = model(removed=("3",))
    same = apply(plan_register("m", "1", version("a"), None, "me"), record)
    assert same.noop and not same.result.created
    with pytest.raises(Conflict, match="already exists with other bytes"):
        apply(plan_register("m", "1", version("c"), None, "me"), record)
    with pytest.raises(Conflict, match="never reused"):
        apply(plan_register("m", "3", version("c"), None, "me"), record)
    assert apply(plan_register("m", None, version("c"), None, "me"), record).result.version == "4"


def test_a_legacy_record_without_hashes_adopts_the_bytes_of_its_next_sync_and_keeps_its_default() -> None:
    legacy = ModelRecord("m", "2", {"1": VersionRecord(X, Y), "2": VersionRecord(X, Y)})
    change = apply(plan_register("m", "1", version("a"), None, "me"), legacy)
    assert change.result.created and change.record.versions["1"].sha256 == "a" * 64
    assert change.record.aliases[STABLE].version == "2", "the highest version was the default: it becomes stable"


def test_an_alias_to_a_missing_version_and_a_split_onto_another_signature_are_refused() -> None:
    with pytest.raises(InvalidInput, match="existing version"):
        apply(plan_alias("m", "canary", "7", "me"), model())
    other = model(versions={"1": version("a"), "2": version("b", OTHER)}, aliases={STABLE: AliasRecord("1"), "canary": AliasRecord("2")})
    with pytest.raises(InvalidInput, match="signature different"):
        apply(plan_traffic("m", {STABLE: 90, "canary": 10}, "me"), other)
    with pytest.raises(InvalidInput, match="does not have"):
        apply(plan_traffic("m", {STABLE: 90, "blue": 10}, "me"), model())
    with pytest.raises(InvalidInput, match="sum to 100"):
        apply(plan_traffic("m", {STABLE: 90}, "me"), model())
    with pytest.raises(InvalidInput, match="signature different"):
        apply(plan_shadow("m", "2", 10, "me"), other)


def test_a_rollback_needs_somewhere_to_go() -> None:
    with pytest.raises(InvalidInput, match="never moved"):
        apply(plan_rollback("m", STABLE, "me"), model())
    with pytest.raises(InvalidInput, match="no alias"):
        apply(plan_rollback("m", "canary", "me"), model())


def test_a_version_in_use_cannot_be_removed_and_a_removal_is_recorded_for_the_autoscaler() -> None:
    record = model(aliases={STABLE: AliasRecord("1"), "canary": AliasRecord("2")})
    with pytest.raises(Conflict, match="alias 'canary'"):
        apply(plan_remove_version("m", "2", "me"), record)
    with pytest.raises(Conflict, match="shadow"):
        apply(plan_remove_version("m", "2", "me"), model(shadow=ShadowRecord("2", 5)))
    change = apply(plan_remove_version("m", "2", "me", "bad"), model())
    assert "2" not in change.record.versions and change.record.removed == ("2",)
    assert [(r.model, r.version, r.reason) for r in change.removals] == [("m", "2", "bad")]
    whole = apply(plan_remove_model("m", "me"), model())
    assert whole.record is None and sorted(r.version for r in whole.removals) == ["1", "2"]
    assert all(r.model_removed for r in whole.removals)


def test_a_hold_is_released_only_for_the_version_the_alias_names() -> None:
    held = model(aliases={STABLE: AliasRecord("2", previous="1", held_at="1")})
    assert apply(plan_release("m", STABLE, "1", "me"), held).noop
    assert apply(plan_release("m", STABLE, "2", "me"), held).record.aliases[STABLE].held_at == ""


def test_an_auto_rollback_gives_the_canary_share_to_stable_once() -> None:
    record = model(aliases={STABLE: AliasRecord("1"), "canary": AliasRecord("2", auto_rollback=RollbackRule())},
                   traffic={STABLE: 80, "canary": 20})
    change = apply(plan_auto_rollback("m", "canary", "2", "failing", {"canary": {"jobs": 60}}, "me"), record)
    assert change.record.traffic == {STABLE: 100, "canary": 0}
    assert change.record.aliases["canary"].auto_rollbacks == 1 and change.entries[0].inputs == {"canary": {"jobs": 60}}
    assert apply(plan_auto_rollback("m", "canary", "2", "again", {}, "me"), change.record).noop


# --- auto-rollback decisions --------------------------------------------------------------------------------------


def test_a_breach_needs_enough_canary_jobs_and_an_excess_over_stable() -> None:
    rule = RollbackRule(error_rate=0.05, p95_ms=50, window_s=60, min_jobs=20)
    assert breach(rule, WindowStats(10, 10), WindowStats(100, 0)) is None, "too few jobs to judge"
    assert breach(rule, WindowStats(40, 2, 10.0), WindowStats(100, 2, 10.0)) is None, "5% vs 2%: within 5 points"
    assert "failure rate" in breach(rule, WindowStats(40, 4, 10.0), WindowStats(100, 2, 10.0))
    assert "p95" in breach(rule, WindowStats(40, 0, 70.0), WindowStats(100, 0, 10.0))


def events(version: str, n: int, failed: int = 0, code: str = "inference_error", start: float = 0.0) -> list[JobEvent]:
    return [JobEvent(f"{version}-{i}", FAILED if i < failed else SUCCEEDED, "m", version, ts=start + i * 0.01,
                     error={"code": code, "message": "x"} if i < failed else None, timings={"inference_ms": 5.0})
            for i in range(n)]


def test_the_window_counts_each_job_once_and_ignores_client_errors_and_shadows() -> None:
    window = OutcomeWindow()
    now = time.time()
    window.add(events("2", 30, failed=10, start=now - 5))
    window.add(events("2", 30, failed=10, start=now - 5))  # redelivered: the same job ids
    window.add(events("3", 10, failed=10, code="invalid_input", start=now - 5))
    window.add([JobEvent("x.shadow", FAILED, "m", "2", ts=now, error={"code": "inference_error", "message": ""})])
    assert window.stats("m", "2", 60, now) == WindowStats(30, 10, 5.0)
    assert window.stats("m", "3", 60, now).jobs == 0
    assert window.stats("m", "2", 1, now).jobs == 0, "older than the window"


def test_only_armed_aliases_with_traffic_are_judged() -> None:
    rule = RollbackRule(error_rate=0.05, window_s=60, min_jobs=10)
    record = model(aliases={STABLE: AliasRecord("1"), "canary": AliasRecord("2", auto_rollback=rule)}, traffic={STABLE: 80, "canary": 20})
    window = OutcomeWindow()
    now = time.time()
    window.add(events("1", 50, start=now - 3) + events("2", 20, failed=8, start=now - 3))
    assert armed(record) == ["canary"]
    decisions = decide(window, {"m": record}, now)
    assert [(d.alias, d.version) for d in decisions] == [("canary", "2")]
    assert decisions[0].inputs["canary"]["failed"] == 8 and decisions[0].inputs["stable"]["jobs"] == 50
    assert decide(window, {"m": replace(record, traffic={STABLE: 100, "canary": 0})}, now) == []


# --- artifacts ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("header, size, expected", [
    ("bytes=0-9", 100, (0, 10)), ("bytes=90-", 100, (90, 100)), ("bytes=-10", 100, (90, 100)),
    ("bytes=95-200", 100, (95, 100)), (None, 100, None), ("bytes=0-1,5-6", 100, None), ("items=0-1", 100, None),
])
def test_single_byte_ranges_are_read_and_others_mean_the_whole_file(header, size, expected) -> None:
    assert parse_range(header, size) == expected


def test_a_range_past_the_end_is_not_satisfiable() -> None:
    with pytest.raises(web.HTTPRequestRangeNotSatisfiable):
        parse_range("bytes=100-", 100)


async def test_the_filesystem_store_keeps_bytes_by_hash_and_installs_them_by_name(tmp_path: Path) -> None:
    source = tmp_path / "model.onnx"
    source.write_bytes(b"abc" * 1000)
    store = FilesystemStore(tmp_path / "repo")
    blob = await store.put_file(source)
    assert blob.sha256 == hashlib.sha256(b"abc" * 1000).hexdigest() and blob.size == 3000
    assert await store.put_file(source) == blob, "the same bytes twice are one blob"
    assert b"".join([c async for c in store.read(blob.sha256, 10, 16)]) == (b"abc" * 1000)[10:16]
    installed = await store.install({"model.onnx": blob.sha256}, tmp_path / "repo" / "m" / "1")
    assert (installed / "model.onnx").read_bytes() == source.read_bytes()
    source.write_bytes(b"changed")
    assert await store.size(blob.sha256) == 3000, "editing the original leaves the stored version alone"


async def test_a_download_is_verified_resumed_with_a_range_and_discarded_when_corrupt(tmp_path: Path) -> None:
    import aiohttp

    payload = bytes(range(256)) * 400
    digest = hashlib.sha256(payload).hexdigest()
    served = {"body": payload}
    ranges: list[str | None] = []

    async def handler(request: web.Request) -> web.Response:
        ranges.append(request.headers.get("Range"))
        span = parse_range(request.headers.get("Range"), len(served["body"]))
        if span:
            return web.Response(status=206, body=served["body"][span[0]:span[1]], headers={"ETag": f'"{digest}"'})
        return web.Response(body=served["body"], headers={"ETag": f'"{digest}"'})

    app = web.Application()
    app.router.add_get("/blob", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    url = f"http://127.0.0.1:{runner.addresses[0][1]}/blob"
    try:
        async with aiohttp.ClientSession() as session:
            target = tmp_path / "out" / "model.onnx"
            target.parent.mkdir()
            (target.parent / "model.onnx.part").write_bytes(payload[:1000])  # an interrupted download
            await fetch(session, url, target, digest, len(payload))
            assert target.read_bytes() == payload and ranges[-1] == "bytes=1000-"
            served["body"] = payload[:-1] + b"\x00"
            with pytest.raises(IntegrityError, match="discarded"):
                await fetch(session, url, tmp_path / "bad" / "model.onnx", digest, len(payload))
            assert not (tmp_path / "bad" / "model.onnx").exists() and not (tmp_path / "bad" / "model.onnx.part").exists()
    finally:
        await runner.cleanup()
    await asyncio.sleep(0)


def test_the_store_setting_names_the_repository_or_an_s3_bucket_and_s3fs_is_imported_only_when_used(tmp_path: Path) -> None:
    from inferq.errors import ConfigError
    from inferq.runtime.artifacts import S3Store, open_store

    assert isinstance(open_store("", tmp_path), FilesystemStore)
    store = open_store("s3://models/inferq", tmp_path, {"client_kwargs": {"endpoint_url": "http://127.0.0.1:9"}})
    assert isinstance(store, S3Store) and store.key("a" * 64) == "models/inferq/sha256/" + "a" * 64
    with pytest.raises(ConfigError, match="s3://"):
        open_store("gs://elsewhere", tmp_path)
