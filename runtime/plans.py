"""The registry's plans: pure functions from a model record to the change to commit, and every refusal.

A plan takes the current record (None: no such model) and the time, and returns a
:class:`Change` (the new record, history entries, removal records) or raises the
4xx error that says why it cannot be done. :class:`~inferq.runtime.registry.Registry`
commits it in one etcd transaction. Nothing here does I/O.

Versions are immutable: different bytes under an existing version are refused,
identical bytes are a no-op, and a removed version's number is not used again.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any

from inferq.broker.topology import VERSION_RE, check_model_name
from inferq.errors import Conflict, InvalidInput, UnknownModel
from inferq.runtime.catalog import config_fields
from inferq.runtime.records import (
    PIPELINE, AliasRecord, HistoryAction, HistoryEntry, ModelRecord, RemovalRecord, RollbackRule, ShadowRecord, StageRecord,
    VersionRecord,
)
from inferq.runtime.repository import ModelConfig
from inferq.runtime.routing import STABLE, check_alias, check_record, check_weights, highest, parse_rule, referrers, with_defaults

KEEP = object()  # "leave the alias's auto-rollback rule as it is"


@dataclass(frozen=True)
class Pushed:
    """The outcome of a push: the version, and whether it is new (identical bytes: not new, nothing changed)."""

    model: str
    version: str
    created: bool
    sha256: str


@dataclass(frozen=True)
class Change:
    """What a plan wants committed: the new record (None deletes the model), history, removals, keys that must not exist."""

    record: ModelRecord | None
    entries: tuple[HistoryEntry, ...] = ()
    removals: tuple[RemovalRecord, ...] = ()
    absent: tuple[str, ...] = ()
    result: Any = None
    noop: bool = False


Plan = Callable[[ModelRecord | None, float], Change]


def _existing(record: ModelRecord | None, model: str) -> ModelRecord:
    if record is None:
        raise UnknownModel(f"model {model!r} is not in the registry (push it with 'inferq models push')")
    return record


def history_entry(model: str, action: HistoryAction, now: float, who: str, target: str = "", from_value: str = "",
                  to_value: str = "", why: str = "", inputs: Mapping[str, Any] | None = None) -> HistoryEntry:
    """One history entry of a change made now by ``who``."""
    return HistoryEntry(model, action, now, who, target, from_value, to_value, why, dict(inputs or {}))


def _commit(record: ModelRecord) -> ModelRecord:
    return check_record(with_defaults(record))


def next_version(record: ModelRecord) -> str:
    """One above every version the model has or ever had."""
    return str(int(highest([*record.versions, *record.removed]) or 0) + 1)


def plan_register(model: str, version: str | None, pushed: VersionRecord, config: ModelConfig | None, who: str,
                  why: str = "", removal_key: Callable[[str], str] | None = None) -> Plan:
    """Add a version (or find the same bytes already there); the first version of a model becomes ``stable``."""
    check_model_name(model)

    def plan(record: ModelRecord | None, now: float) -> Change:
        current = record or ModelRecord(model, "", {}, **config_fields(config or ModelConfig()))
        v = version or next_version(current)
        if not VERSION_RE.match(v):
            raise InvalidInput(f"version {v!r} must be a whole number (1-9 digits)")
        if v in current.removed:
            raise Conflict(f"version {v} of {model!r} was removed and version numbers are never reused; push a new version")
        fields = config_fields(config) if config is not None else {}
        existing = current.versions.get(v)
        if existing is not None and existing.sha256:
            if not existing.same_content(pushed):
                raise Conflict(f"version {v} of {model!r} already exists with other bytes (sha256 {existing.sha256}, "
                               f"pushed {pushed.sha256}); versions are immutable: push it as a new version")
            changed = {k: val for k, val in fields.items() if getattr(current, k) != val}
            if not changed:
                return Change(current, result=Pushed(model, v, False, pushed.sha256), noop=True)
            entry = history_entry(model, HistoryAction.PUSH, now, who, "config", why=why or "config updated")
            return Change(_commit(replace(current, **changed)), (entry,), result=Pushed(model, v, False, pushed.sha256))
        stamped = replace(pushed, created_at=now, created_by=who)
        versions = dict(sorted({**current.versions, v: stamped}.items(), key=lambda kv: int(kv[0])))
        entries = [history_entry(model, HistoryAction.PUSH, now, who, v, to_value=pushed.sha256, why=why)]
        aliases = dict(current.aliases)
        if STABLE not in aliases:
            # A record from before the registry keeps its default (the highest version) as stable.
            first = current.default_version if current.default_version in versions else v
            aliases[STABLE] = AliasRecord(first, moved_at=now, moved_by=who)
            why_stable = "first version of the model" if first == v else "the default version before the registry"
            entries.append(history_entry(model, HistoryAction.ALIAS, now, who, STABLE, to_value=first, why=why_stable))
        new = _commit(replace(current, versions=versions, aliases=aliases, **fields))
        absent = (removal_key(v),) if removal_key else ()
        return Change(new, tuple(entries), absent=absent, result=Pushed(model, v, True, pushed.sha256))

    return plan


def plan_pipeline(model: str, stages: tuple[StageRecord, ...], signature: VersionRecord, who: str, why: str = "") -> Plan:
    """Create or replace the pipeline ``model`` (one version, "1", with the pipeline's signature); a plain model is refused."""
    check_model_name(model)
    if len(stages) < 1:
        raise InvalidInput("a pipeline needs at least one stage")
    if any(st.model == model for st in stages):
        raise InvalidInput(f"pipeline {model!r} cannot be one of its own stages")

    def plan(record: ModelRecord | None, now: float) -> Change:
        if record is not None and not record.pipeline:
            raise Conflict(f"{model!r} is a model with versions of its own; give the pipeline another name (--as)")
        if record is not None and record.stages == stages and record.versions.get("1") == signature:
            return Change(record, result=model, noop=True)
        aliases = {STABLE: AliasRecord("1", moved_at=now, moved_by=who)}
        new = ModelRecord(model, "1", {"1": replace(signature, created_at=now, created_by=who)}, aliases=aliases,
                          kind=PIPELINE, stages=stages)
        chain = " -> ".join(f"{st.model}:{st.version}" for st in stages)
        entry = history_entry(model, HistoryAction.PUSH, now, who, "stages", to_value=chain, why=why or "pipeline stages set")
        return Change(_commit(new), (entry,), result=model)

    return plan


def plan_alias(model: str, alias: str, version: str, who: str, why: str = "", rule: Any = KEEP) -> Plan:
    """Point ``alias`` at ``version``; traffic stays on the version it left until the new one is ready."""
    check_alias(alias)

    def plan(record: ModelRecord | None, now: float) -> Change:
        current = _existing(record, model)
        if version not in current.versions:
            raise InvalidInput(f"model {model!r} has no version {version!r} (has {sorted(current.versions, key=int)}): "
                               "an alias must name an existing version")
        old = current.aliases.get(alias)
        new_rule = (old.auto_rollback if old else None) if rule is KEEP else rule
        if old is not None and old.version == version and old.auto_rollback == new_rule:
            return Change(current, result=old, noop=True)
        if old is None:
            moved = AliasRecord(version, moved_at=now, moved_by=who, auto_rollback=new_rule)
        elif old.version == version:
            moved = replace(old, auto_rollback=new_rule)
        else:
            moved = replace(old, version=version, previous=old.version, held_at=old.held_at or old.version,
                            moved_at=now, moved_by=who, auto_rollback=new_rule)
        entry = history_entry(model, HistoryAction.ALIAS, now, who, alias, old.version if old else "", version, why,
                       {"auto_rollback": dataclasses.asdict(new_rule)} if new_rule else None)
        return Change(_commit(replace(current, aliases={**current.aliases, alias: moved})), (entry,), result=moved)

    return plan


def plan_rollback(model: str, alias: str, who: str, why: str = "") -> Plan:
    """Move ``alias`` back to its previous version at once (a rollback is never held)."""
    def plan(record: ModelRecord | None, now: float) -> Change:
        current = _existing(record, model)
        old = current.aliases.get(alias)
        if old is None:
            raise InvalidInput(f"model {model!r} has no alias {alias!r} (has {sorted(current.aliases)})")
        if not old.previous or old.previous == old.version:
            raise InvalidInput(f"alias {alias!r} of {model!r} has never moved: there is no previous version to go back to")
        if old.previous not in current.versions:
            raise InvalidInput(f"alias {alias!r} of {model!r} was at version {old.previous}, which was removed")
        moved = replace(old, version=old.previous, previous=old.version, held_at="", moved_at=now, moved_by=who)
        entry = history_entry(model, HistoryAction.ROLLBACK, now, who, alias, old.version, old.previous, why)
        return Change(_commit(replace(current, aliases={**current.aliases, alias: moved})), (entry,), result=moved)

    return plan


def plan_unalias(model: str, alias: str, who: str, why: str = "") -> Plan:
    """Remove an alias; refused while it carries traffic."""
    def plan(record: ModelRecord | None, now: float) -> Change:
        current = _existing(record, model)
        if alias not in current.aliases:
            raise InvalidInput(f"model {model!r} has no alias {alias!r}")
        if current.traffic.get(alias):
            raise Conflict(f"alias {alias!r} carries {current.traffic[alias]}% of {model!r}'s traffic; change the split first")
        aliases = {k: v for k, v in current.aliases.items() if k != alias}
        traffic = {k: v for k, v in current.traffic.items() if k != alias}
        entry = history_entry(model, HistoryAction.UNALIAS, now, who, alias, current.aliases[alias].version, "", why)
        return Change(_commit(replace(current, aliases=aliases, traffic=traffic)), (entry,))

    return plan


def describe_weights(weights: Mapping[str, int]) -> str:
    """``stable=90,canary=10`` ("" for no split)."""
    return ",".join(f"{k}={v}" for k, v in sorted(weights.items()))


def plan_traffic(model: str, weights: Mapping[str, Any], who: str, why: str = "") -> Plan:
    """Set the split of unpinned jobs (an empty map clears it)."""
    checked = check_weights(weights)

    def plan(record: ModelRecord | None, now: float) -> Change:
        current = _existing(record, model)
        if dict(current.traffic) == checked:
            return Change(current, noop=True)
        entry = history_entry(model, HistoryAction.TRAFFIC, now, who, "traffic", describe_weights(current.traffic),
                       describe_weights(checked), why)
        return Change(_commit(replace(current, traffic=checked)), (entry,))

    return plan


def plan_shadow(model: str, version: str | None, percent: float, who: str, why: str = "") -> Plan:
    """Mirror ``percent`` of unpinned jobs to ``version`` (None: stop mirroring)."""
    def plan(record: ModelRecord | None, now: float) -> Change:
        current = _existing(record, model)
        shadow = ShadowRecord(version, float(percent)) if version is not None else None
        if current.shadow == shadow:
            return Change(current, noop=True)
        describe = lambda s: f"{s.version}@{s.percent:g}%" if s else ""  # noqa: E731
        entry = history_entry(model, HistoryAction.SHADOW, now, who, "shadow", describe(current.shadow), describe(shadow), why)
        return Change(_commit(replace(current, shadow=shadow)), (entry,))

    return plan


def plan_remove_version(model: str, version: str, who: str, why: str = "") -> Plan:
    """Remove a version nothing points at; its queued jobs will end ``failed: version_removed``."""
    def plan(record: ModelRecord | None, now: float) -> Change:
        current = _existing(record, model)
        if version not in current.versions:
            raise UnknownModel(f"model {model!r} has no version {version!r} (has {sorted(current.versions, key=int)})")
        users = referrers(current, version)
        if users:
            raise Conflict(f"version {version} of {model!r} is still in use by {', '.join(users)}; move those first")
        versions = {k: v for k, v in current.versions.items() if k != version}
        new = _commit(replace(current, versions=versions, removed=tuple(sorted({*current.removed, version}, key=int))))
        removal = RemovalRecord(model, version, now, who, why)
        entry = history_entry(model, HistoryAction.REMOVE, now, who, version, current.versions[version].sha256, "", why)
        return Change(new, (entry,), (removal,))

    return plan


def plan_remove_model(model: str, who: str, why: str = "") -> Plan:
    """Remove a model with all its versions and aliases; every queued job of it ends ``version_removed``."""
    def plan(record: ModelRecord | None, now: float) -> Change:
        current = _existing(record, model)
        removals = [RemovalRecord(model, v, now, who, why, model_removed=True) for v in current.versions]
        removals = removals or [RemovalRecord(model, "", now, who, why, model_removed=True)]
        entry = history_entry(model, HistoryAction.REMOVE, now, who, "model", ",".join(current.versions), "", why)
        return Change(None, (entry,), tuple(removals))

    return plan


def plan_release(model: str, alias: str, version: str, who: str) -> Plan:
    """End the hold of an alias whose new version has become ready."""
    def plan(record: ModelRecord | None, now: float) -> Change:
        current = _existing(record, model)
        old = current.aliases.get(alias)
        if old is None or not old.held_at or old.version != version:
            return Change(current, noop=True)
        entry = history_entry(model, HistoryAction.RELEASE, now, who, alias, old.held_at, version,
                       f"version {version} has a warmed-up worker")
        released = replace(old, held_at="")
        return Change(_commit(replace(current, aliases={**current.aliases, alias: released})), (entry,))

    return plan


def plan_auto_rollback(model: str, alias: str, version: str, why: str, inputs: Mapping[str, Any], who: str) -> Plan:
    """Give an alias's traffic back to stable (the alias still names its version); recorded with the decision's inputs."""
    def plan(record: ModelRecord | None, now: float) -> Change:
        current = _existing(record, model)
        old = current.aliases.get(alias)
        share = current.traffic.get(alias, 0)
        if old is None or old.version != version or not share or STABLE not in current.aliases or alias == STABLE:
            return Change(current, noop=True)
        traffic = {**current.traffic, alias: 0, STABLE: current.traffic.get(STABLE, 0) + share}
        updated = replace(old, auto_rollbacks=old.auto_rollbacks + 1, last_auto_rollback=why)
        entry = history_entry(model, HistoryAction.AUTO_ROLLBACK, now, who, alias, describe_weights(current.traffic),
                       describe_weights(traffic), why, inputs)
        return Change(_commit(replace(current, traffic=traffic, aliases={**current.aliases, alias: updated})), (entry,))

    return plan


def parse_rule_or_none(value: Any) -> RollbackRule | None:
    """An auto-rollback rule from a request (None or "off" turns it off)."""
    if value is None or value in ("", "off", "none"):
        return None
    return parse_rule(value)
