"""Model variants per device, and which nodes may run a model: pure rules, no I/O.

A model's ``config.toml`` may name variants of its file for some devices, each with a
device selector (see README, "Model variants")::

    [variants.int8]
    file = "model-int8.onnx"
    soc = "tegra234"

    require = { provider = "tensorrt" }     # only nodes that proved TensorRT run it at all

A selector names facts of a node: ``soc`` (tegra234), ``cuda_arch`` (8.7), ``kind``
(jetson or host), ``module`` (a case-insensitive part of the device-tree model, "AGX
Orin") and ``provider`` (an execution provider the node proved). It matches a node
when every fact it names does. Among the variants that match, the most specific (the
most facts named) wins, ties by declaration order; none matching means the plain
``model.onnx`` (the default). Placement filters nodes by free capacity, required
providers and the ``require`` selector, then ranks them by variant match, cache warmth
(the node already has the artifact) and free capacity.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from inferq.errors import ConfigError, NoCapacity

if TYPE_CHECKING:
    from inferq.runtime.records import ModelRecord, NodeRecord, VariantRecord, VersionRecord

SELECTOR_KEYS = ("soc", "cuda_arch", "kind", "module", "provider")
KINDS = ("jetson", "host")
VARIANT_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,31}$")
FILE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}\.onnx$")


def check_selector(selector: Any, what: str, empty_ok: bool = False) -> dict[str, str]:
    """``selector`` as a plain map of known facts to non-empty strings, else ConfigError saying what is wrong."""
    if not isinstance(selector, Mapping):
        raise ConfigError(f"{what} must be a table of device facts ({', '.join(SELECTOR_KEYS)})")
    unknown = sorted(set(selector) - set(SELECTOR_KEYS))
    if unknown:
        raise ConfigError(f"{what}: unknown device fact(s) {unknown} (known: {', '.join(SELECTOR_KEYS)})")
    for key, value in selector.items():
        if not isinstance(value, str) or not value.strip():
            raise ConfigError(f"{what}: {key} must be a non-empty string, got {value!r}")
    if selector.get("kind", "jetson") not in KINDS:
        raise ConfigError(f"{what}: kind must be one of {list(KINDS)}, got {selector['kind']!r}")
    if not selector and not empty_ok:
        raise ConfigError(f"{what} names no device fact ({', '.join(SELECTOR_KEYS)}): it would match every node")
    return {k: selector[k].strip() for k in selector}


@dataclass(frozen=True)
class VariantConfig:
    """One ``[variants.NAME]`` table: the variant's file in each version directory, and its device selector."""

    file: str
    selector: Mapping[str, str]

    @classmethod
    def parse(cls, name: str, raw: Any) -> VariantConfig:
        """A variant from its TOML table (``file`` plus selector keys); ConfigError on anything else."""
        what = f"[variants.{name}]"
        if not VARIANT_NAME.match(name):
            raise ConfigError(f"{what}: a variant name is 1-32 of a-z, 0-9, _ and -, starting with a letter or digit")
        if not isinstance(raw, Mapping):
            raise ConfigError(f"{what} must be a table with file = \"...\" and a device selector")
        raw = dict(raw)
        file = raw.pop("file", None)
        if not isinstance(file, str) or not FILE_NAME.match(file) or file == "model.onnx":
            raise ConfigError(f"{what}: file must name an .onnx file beside model.onnx (not model.onnx itself), got {file!r}")
        return cls(file, check_selector(raw, what))

    def to_dict(self) -> dict[str, str]:
        """The TOML table again: ``file`` and the selector's keys side by side."""
        return {"file": self.file, **self.selector}


def parse_variants(raw: Any) -> dict[str, VariantConfig]:
    """The ``[variants]`` section: name -> VariantConfig, in declaration order; two variants may not share a file."""
    if not isinstance(raw, Mapping):
        raise ConfigError("[variants] must be a table of [variants.NAME] tables")
    variants = {str(name): VariantConfig.parse(str(name), table) for name, table in raw.items()}
    files = [v.file for v in variants.values()]
    if len(set(files)) != len(files):
        raise ConfigError(f"[variants]: two variants name the same file ({sorted(f for f in files if files.count(f) > 1)[0]})")
    return variants


# --- a node's facts against a selector ---------------------------------------------------------------------------


def node_facts(node: NodeRecord) -> dict[str, str | tuple[str, ...]]:
    """What a selector can ask of a node: its device facts and the providers it proved."""
    facts = node.facts
    return {"soc": facts.soc, "cuda_arch": facts.cuda_arch, "kind": facts.kind, "module": facts.model,
            "provider": tuple(node.providers)}


def mismatch(selector: Mapping[str, str], node: NodeRecord) -> str:
    """Why ``node`` does not match ``selector`` ("" when it does): the first fact that differs."""
    facts = node_facts(node)
    for key, wanted in selector.items():
        have = facts.get(key, "")
        if key == "provider":
            if wanted not in have:
                return f"provider {wanted} not proven (has {', '.join(have) or 'none'})"
        elif key == "module":
            if wanted.lower() not in str(have).lower():
                return f"module {have or 'unknown'!r} is not {wanted!r}"
        elif have != wanted:
            return f"{key} is {have or 'unknown'!r}, not {wanted!r}"
    return ""


def choose_variant(variants: Sequence[VariantRecord], node: NodeRecord) -> VariantRecord | None:
    """The variant ``node`` runs: the most specific match, ties by declaration order; None for the default file."""
    best: VariantRecord | None = None
    for variant in variants:
        if not mismatch(variant.selector, node) and (best is None or len(variant.selector) > len(best.selector)):
            best = variant
    return best


def unfit(node: NodeRecord, require: Mapping[str, str], require_providers: Sequence[str]) -> str:
    """Why ``node`` may not run a model with these requirements ("" when it may); capacity is not looked at."""
    missing = sorted(set(require_providers) - set(node.providers))
    if missing:
        return f"lacks required provider(s) {missing} (proved {', '.join(node.providers) or 'none'})"
    why = mismatch(require, node)
    return f"does not meet require: {why}" if why else ""


# --- placement ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Placement:
    """Where a worker goes, which variant it runs there ("" for the default) and the artifact it needs."""

    node: str
    variant: str
    sha256: str


def artifact_for(version: VersionRecord | None, node: NodeRecord) -> tuple[str, str, int]:
    """(variant name or "", the SHA-256 of the file the node would run, the variant's specificity)."""
    if version is None:
        return "", "", 0
    chosen = choose_variant(version.variants, node)
    if chosen is None:
        return "", version.sha256, 0
    return chosen.name, chosen.sha256, len(chosen.selector)


def place(nodes: Mapping[str, NodeRecord], record: ModelRecord | None, version: str,
          requires: Sequence[str] = ()) -> Placement:
    """The node for one more worker of ``record:version``, or NoCapacity listing why each node was passed over.

    Only nodes with free capacity that meet the model's required providers and ``require``
    selector fit; among them a node that gets a device variant wins (the more specific
    the better), then one that already caches that artifact, then the one with most free room.
    """
    found = record.versions.get(version) if record is not None else None
    require = dict(record.require) if record is not None else {}
    wanted = tuple(requires) or (tuple(record.require_providers) if record is not None else ())
    ranked, reasons = [], {}
    for name, node in sorted(nodes.items()):
        why = unfit(node, require, wanted) or (f"full ({node.workers}/{node.capacity} workers)" if node.free <= 0 else "")
        if why:
            reasons[name] = why
            continue
        variant, sha256, specificity = artifact_for(found, node)
        ranked.append(((specificity, bool(sha256) and sha256 in node.cached, node.free, name), Placement(name, variant, sha256)))
    if not ranked:
        detail = "; ".join(f"{n}: {why}" for n, why in reasons.items()) or "no edge node has registered"
        raise NoCapacity(f"no edge node can run {record.name if record else '?'}:{version} ({detail})")
    return max(ranked, key=lambda r: r[0])[1]
