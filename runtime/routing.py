"""The registry's rules, pure: alias names, traffic splits, health gates, shadow selection, auto-rollback.

Nothing here does I/O, so the edge (HTTP jobs), the edge's AMQP router, the
autoscaler and the unit tests all apply the same rules::

    unpinned job --route key--> bucket in [0, 100) --traffic split--> alias --hold?--> version

* An alias names a version; after a move it may be *held* at the version it
  left until the new one has a warmed-up worker (a rollback is never held).
* A traffic split gives integer percents to aliases (summing to 100). A target
  other than ``stable`` gets its share only while its version is ready; a held
  share goes to ``stable``, the fallback, which is never held back (its jobs wait
  in the queue for a worker, as with scale from zero).
* The route key is the sticky key (``X-Inferq-Route-Key``), else the idempotency
  key, else the job id; its SHA-256 decides, so every edge picks the same alias.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from inferq.errors import InvalidInput, ModelUnavailable, UnknownModel
from inferq.runtime.records import AliasRecord, ModelRecord, RollbackRule, VersionRecord

STABLE = "stable"
ALIAS_RE = re.compile(r"^[a-z][a-z0-9-]{0,31}$")
SPLIT_SALT = "split"
SHADOW_SALT = "shadow"
RULE_FIELDS = {"error_rate": float, "p95_ms": float, "window_s": float, "min_jobs": int}
MAX_WINDOW_S = 3600.0


def check_alias(name: str) -> str:
    """``name`` if it is a valid alias (``[a-z][a-z0-9-]{0,31}``), else InvalidInput."""
    if not isinstance(name, str) or not ALIAS_RE.match(name):
        raise InvalidInput(f"alias {name!r} must match [a-z][a-z0-9-]{{0,31}}")
    return name


def highest(versions: Iterable[str]) -> str:
    """The highest of integer version names ("" if none)."""
    return max(versions, key=int, default="")


def default_version(record: ModelRecord) -> str:
    """Where an unpinned job goes without a split: the ``stable`` alias, else the highest version."""
    stable = record.aliases.get(STABLE)
    if stable is not None and stable.version in record.versions:
        return stable.version
    return highest(record.versions)


def bucket(model: str, key: str, salt: str = SPLIT_SALT) -> float:
    """A number in [0, 100) that depends only on (salt, model, key): the same on every edge and every run."""
    digest = hashlib.sha256(f"{salt}\x00{model}\x00{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % 10_000 / 100


def parse_weights(items: Sequence[str]) -> dict[str, int]:
    """``["stable=90", "canary=10"]`` as a map; InvalidInput on a malformed item."""
    weights: dict[str, int] = {}
    for item in items:
        name, sep, value = item.partition("=")
        try:
            weights[check_alias(name.strip())] = int(value) if sep else -1
        except ValueError:
            raise InvalidInput(f"traffic weight {item!r} must be ALIAS=PERCENT, e.g. stable=90") from None
        if weights[name.strip()] < 0:
            raise InvalidInput(f"traffic weight {item!r} must be ALIAS=PERCENT with a whole percent >= 0")
    return check_weights(weights)


def check_weights(weights: Mapping[str, Any]) -> dict[str, int]:
    """Whole percents >= 0 per alias, summing to 100; an empty map means "no split"."""
    checked: dict[str, int] = {}
    for name, value in weights.items():
        check_alias(name)
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 100:
            raise InvalidInput(f"traffic weight of {name!r} must be a whole percent from 0 to 100, got {value!r}")
        checked[name] = value
    if checked and sum(checked.values()) != 100:
        raise InvalidInput(f"traffic weights must sum to 100, these sum to {sum(checked.values())}: {checked}")
    return checked


def parse_rule(spec: str | Mapping[str, Any]) -> RollbackRule:
    """An auto-rollback rule from ``"error_rate=0.05,p95_ms=200,window_s=60,min_jobs=50"`` or a JSON map."""
    if isinstance(spec, str):
        doc: dict[str, Any] = {}
        for part in filter(None, (p.strip() for p in spec.split(","))):
            name, sep, value = part.partition("=")
            if not sep or name not in RULE_FIELDS:
                raise InvalidInput(f"auto-rollback setting {part!r}: expected one of {sorted(RULE_FIELDS)} as NAME=VALUE")
            try:
                doc[name] = RULE_FIELDS[name](value)
            except ValueError:
                raise InvalidInput(f"auto-rollback setting {part!r} is not a number") from None
    elif isinstance(spec, Mapping):
        doc = dict(spec)
    else:
        raise InvalidInput("auto_rollback must be a map or NAME=VALUE,... text")
    unknown = set(doc) - set(RULE_FIELDS)
    if unknown:
        raise InvalidInput(f"unknown auto-rollback setting(s) {sorted(unknown)}")
    for name, value in doc.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise InvalidInput(f"auto-rollback {name} must be a finite number, got {value!r}")
    rule = RollbackRule(**{k: RULE_FIELDS[k](v) for k, v in doc.items()})
    if not (0 <= rule.error_rate <= 1 and rule.p95_ms >= 0 and 0 < rule.window_s <= MAX_WINDOW_S and rule.min_jobs >= 1):
        raise InvalidInput(f"auto-rollback needs 0 <= error_rate <= 1, p95_ms >= 0, 0 < window_s <= {MAX_WINDOW_S:g}, "
                           f"min_jobs >= 1: {rule}")
    return rule


# --- invariants: what the registry refuses to store --------------------------------------------------------


def baseline(record: ModelRecord) -> VersionRecord | None:
    """The version every split target, alias under traffic and shadow must match: stable's (or the default)."""
    version = default_version(record)
    return record.versions.get(version)


def check_record(record: ModelRecord) -> ModelRecord:
    """``record`` if the system can honour it, else InvalidInput saying what cannot be (never silently ignored)."""
    for name, alias in record.aliases.items():
        if alias.version not in record.versions:
            raise InvalidInput(f"alias {name!r} points at version {alias.version!r}, which model {record.name!r} does not have")
    base = baseline(record)
    weights = check_weights(record.traffic)
    for name, weight in weights.items():
        if name not in record.aliases:
            raise InvalidInput(f"traffic names alias {name!r}, which model {record.name!r} does not have "
                               f"(has {sorted(record.aliases)})")
        target = record.versions[record.aliases[name].version]
        if weight and base is not None and not target.same_signature(base):
            raise InvalidInput(f"alias {name!r} (version {record.aliases[name].version}) has a signature different from "
                               f"stable's (version {default_version(record)}): a split onto it would fail its jobs")
    if record.shadow is not None:
        shadow = record.shadow
        if shadow.version not in record.versions:
            raise InvalidInput(f"shadow version {shadow.version!r} is not a version of model {record.name!r}")
        if not 0 < shadow.percent <= 100:
            raise InvalidInput(f"shadow percent must be above 0 and at most 100, got {shadow.percent!r}")
        if base is not None and not record.versions[shadow.version].same_signature(base):
            raise InvalidInput(f"shadow version {shadow.version} has a signature different from stable's "
                               f"(version {default_version(record)}): its outputs could not be compared")
    return record


def with_defaults(record: ModelRecord) -> ModelRecord:
    """``record`` with its default version recomputed from its aliases and versions."""
    return replace(record, default_version=default_version(record))


def referrers(record: ModelRecord, version: str) -> list[str]:
    """What still points at ``version``: aliases (also as a held version), traffic, shadow."""
    found = []
    for name, alias in sorted(record.aliases.items()):
        if alias.version == version:
            found.append(f"alias {name!r}")
        elif alias.held_at == version:
            found.append(f"alias {name!r} (held at it until version {alias.version} is ready)")
    for name, weight in sorted(record.traffic.items()):
        if weight and name in record.aliases and record.aliases[name].version == version:
            found.append(f"traffic ({name}={weight})")
    if record.shadow is not None and record.shadow.version == version:
        found.append(f"shadow ({record.shadow.percent:g}%)")
    return found


# --- resolution: which version a job goes to ---------------------------------------------------------------


@dataclass(frozen=True)
class Route:
    """Where one job goes: the concrete version, the alias that chose it ("" when pinned by version)."""

    model: str
    version: str
    alias: str = ""


@dataclass(frozen=True)
class Split:
    """The split in force now: effective percents per alias, the version each alias serves, and why any was held."""

    weights: dict[str, int]
    versions: dict[str, str]
    notes: list[str] = field(default_factory=list)


def alias_version(record: ModelRecord, name: str, ready: set[str]) -> tuple[str, str]:
    """The version an alias serves now and, if it is held, why."""
    alias: AliasRecord = record.aliases[name]
    if alias.held_at and alias.held_at != alias.version and alias.held_at in record.versions and alias.version not in ready:
        return alias.held_at, (f"alias {name} -> {alias.version} is held at {alias.held_at}: no worker of version "
                               f"{alias.version} has finished warm-up yet")
    return alias.version, ""


def split(record: ModelRecord, ready: set[str]) -> Split | None:
    """The effective split (None without one): a target other than stable whose version is not ready gets 0."""
    if not record.traffic:
        return None
    weights, versions, notes = dict(record.traffic), {}, []
    for name in record.traffic:
        versions[name], note = alias_version(record, name, ready)
        notes += [note] if note else []
    held = 0
    for name, weight in record.traffic.items():
        if weight and name != STABLE and versions[name] not in ready:
            notes.append(f"{name} (version {versions[name]}) holds {weight}% at 0: no worker of it holds a lease and "
                         "has finished warm-up")
            weights[name], held = 0, held + weight
    if held:
        _give_back(record, ready, weights, versions, held, notes)
    return Split(weights, versions, notes)


def _give_back(record: ModelRecord, ready: set[str], weights: dict[str, int], versions: dict[str, str], held: int,
               notes: list[str]) -> None:
    """Hand a held share to stable, or, without a stable alias, to the ready targets in proportion."""
    if STABLE in record.aliases:
        weights[STABLE] = weights.get(STABLE, 0) + held
        versions.setdefault(STABLE, alias_version(record, STABLE, ready)[0])
        return
    live = {n: w for n, w in weights.items() if w}
    if not live:  # no target ready and no fallback: the configured split, and the jobs wait for workers
        weights.update(record.traffic)
        notes.append("no target of the split is ready: the configured weights apply and jobs wait for workers")
        return
    total = sum(live.values())
    for name in live:
        weights[name] += held * live[name] // total
    weights[max(live)] += 100 - sum(weights.values())


def choose(record: ModelRecord, ready: set[str], key: str, version: str | None = None, alias: str | None = None) -> Route:
    """The route of one job: pinned by ``version`` or ``alias``, else through the split or the default."""
    if not record.versions:
        raise ModelUnavailable(f"model {record.name!r} has no servable version: every version was removed "
                               f"(push one with 'inferq models push')")
    if version is not None:
        if version not in record.versions:
            raise UnknownModel(f"model {record.name!r} has no version {version!r} (has {sorted(record.versions, key=int)})")
        return Route(record.name, version)
    if alias is not None:
        if alias not in record.aliases:
            raise UnknownModel(f"model {record.name!r} has no alias {alias!r} (has {sorted(record.aliases)})")
        return Route(record.name, alias_version(record, alias, ready)[0], alias)
    effective = split(record, ready)
    if effective is None:
        if STABLE in record.aliases:
            return Route(record.name, alias_version(record, STABLE, ready)[0], STABLE)
        return Route(record.name, default_version(record))
    point, upto = bucket(record.name, key), 0
    for name in sorted(effective.weights):
        upto += effective.weights[name]
        if point < upto:
            return Route(record.name, effective.versions[name], name)
    name = max((n for n, w in effective.weights.items() if w), default=STABLE)  # unreachable when weights sum to 100
    return Route(record.name, effective.versions.get(name, default_version(record)), name)


def mirror(record: ModelRecord, key: str, route: Route) -> str | None:
    """The shadow version a job is copied to, if it falls in the shadow's share and did not run there anyway."""
    shadow = record.shadow
    if shadow is None or shadow.version == route.version or shadow.version not in record.versions:
        return None
    return shadow.version if bucket(record.name, key, SHADOW_SALT) < shadow.percent else None


def traffic_versions(record: ModelRecord) -> set[str]:
    """Versions that unpinned jobs may reach (the default, aliases under traffic and where they are held)."""
    names = {n for n, w in record.traffic.items() if w} | ({STABLE} if not record.traffic else set())
    found = {record.default_version} if record.default_version else set()
    for name in names & set(record.aliases):
        alias = record.aliases[name]
        found |= {alias.version} | ({alias.held_at} if alias.held_at in record.versions else set())
    return found


def worker_floors(record: ModelRecord, policy_min: int) -> dict[str, int]:
    """The fewest workers each version keeps.

    Stable's version (or the default) keeps the policy's ``min_workers`` (0 allows
    scale to zero); a version that must open a gate (a split target besides stable,
    an alias waiting for warm-up) keeps at least one, or it could never become ready.
    """
    floors = {v: 0 for v in record.versions}
    targets = [n for n, w in record.traffic.items() if w and n in record.aliases]
    if STABLE in record.aliases and STABLE not in targets:
        targets.append(STABLE)
    if not record.aliases and record.default_version:
        floors[record.default_version] = policy_min
    for name in targets:
        alias, base = record.aliases[name], policy_min if name == STABLE else 1
        if alias.held_at in record.versions and alias.held_at != alias.version:
            floors[alias.held_at] = max(floors[alias.held_at], base)
            floors[alias.version] = max(floors[alias.version], base, 1)
        else:
            floors[alias.version] = max(floors[alias.version], base)
    return floors


# --- auto-rollback -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class WindowStats:
    """Finished jobs of one version within a window: how many, how many failed, and their p95 latency."""

    jobs: int = 0
    failed: int = 0
    p95_ms: float | None = None

    @property
    def failure_rate(self) -> float:
        return self.failed / self.jobs if self.jobs else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"jobs": self.jobs, "failed": self.failed, "failure_rate": round(self.failure_rate, 4), "p95_ms": self.p95_ms}


def percentile(values: Sequence[float], q: float) -> float | None:
    """The nearest-rank ``q`` percentile (None for no values)."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q / 100 * len(ordered)) - 1))]


def breach(rule: RollbackRule, canary: WindowStats, stable: WindowStats) -> str | None:
    """Why the canary must lose its traffic, or None (also None before ``min_jobs`` canary jobs finished)."""
    if canary.jobs < rule.min_jobs:
        return None
    excess = canary.failure_rate - stable.failure_rate
    if excess > rule.error_rate:
        return (f"failure rate {canary.failure_rate:.1%} over {canary.jobs} jobs vs stable's {stable.failure_rate:.1%}: "
                f"{excess:.1%} above it, tolerance {rule.error_rate:.1%}")
    if rule.p95_ms and canary.p95_ms is not None and stable.p95_ms is not None and canary.p95_ms - stable.p95_ms > rule.p95_ms:
        return (f"p95 {canary.p95_ms:.1f} ms vs stable's {stable.p95_ms:.1f} ms: {canary.p95_ms - stable.p95_ms:.1f} ms "
                f"above it, tolerance {rule.p95_ms:g} ms")
    return None
