"""``inferq models push|pull|show|alias|unalias|rollback|traffic|shadow|remove``: the registry from the shell.

Each command talks to an edge's registry API (``--url``, ``--api-key`` as for the
other client commands), or with ``--direct`` straight to etcd (and, for ``push``,
to the artifact store this host's settings name), as the API itself would.
``pull`` verifies the SHA-256 of every file it downloads.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from inferq.errors import ConfigError, InvalidInput
from inferq.settings import Settings

log = logging.getLogger("inferq.cli")

MODEL_FILE = "model.onnx"


def add_commands(msub: Any, client: argparse.ArgumentParser) -> None:
    """The registry subcommands of ``inferq models``."""
    direct = argparse.ArgumentParser(add_help=False)
    direct.add_argument("--direct", action="store_true", help="write to etcd (and the artifact store) instead of an edge's API")
    direct.add_argument("--reason", default="", help="why, for the model's history")

    push = msub.add_parser("push", parents=[client, direct], help="push a version (immutable: other bytes under a version are refused)")
    push.add_argument("path", help="a model.onnx (or any .onnx) file, or a directory holding model.onnx and its external data")
    push.add_argument("--model", required=True)
    push.add_argument("--version", help="the version number (default: one above every version the model has had)")
    # Its own dest: "config" is the global --config (the settings file), which this would overwrite.
    push.add_argument("--config", dest="model_config", help="the model's config.toml")
    push.set_defaults(func=_command, command=push_command)

    pull = msub.add_parser("pull", parents=[client], help="download a version's files, verifying their SHA-256")
    pull.add_argument("target", metavar="NAME[:VERSION|:ALIAS]")
    pull.add_argument("directory")
    pull.add_argument("--variant", default="", help="the files of this device variant (its ONNX file saved as model.onnx)")
    pull.set_defaults(func=_command, command=pull_command)

    show = msub.add_parser("show", parents=[client], help="a model's document: versions, aliases, traffic, health, history")
    show.add_argument("model")
    show.set_defaults(func=_command, command=show_command)

    alias = msub.add_parser("alias", parents=[client, direct], help="point an alias at a version (traffic follows once it is ready)")
    alias.add_argument("model")
    alias.add_argument("alias")
    alias.add_argument("version")
    alias.add_argument("--auto-rollback", metavar="SPEC",
                       help="error_rate=0.05,p95_ms=200,window_s=60,min_jobs=50 (or 'off'): take its traffic back to stable on breach")
    alias.set_defaults(func=_command, command=alias_command)

    unalias = msub.add_parser("unalias", parents=[client, direct], help="remove an alias (refused while it has traffic)")
    unalias.add_argument("model")
    unalias.add_argument("alias")
    unalias.set_defaults(func=_command, command=unalias_command)

    rollback = msub.add_parser("rollback", parents=[client, direct], help="move an alias back to its previous version, at once")
    rollback.add_argument("model")
    rollback.add_argument("alias", nargs="?", default="stable")
    rollback.set_defaults(func=_command, command=rollback_command)

    traffic = msub.add_parser("traffic", parents=[client, direct], help="split unpinned jobs: stable=90 canary=10 (--clear: no split)")
    traffic.add_argument("model")
    traffic.add_argument("weights", nargs="*", metavar="ALIAS=PERCENT")
    traffic.add_argument("--clear", action="store_true")
    traffic.set_defaults(func=_command, command=traffic_command)

    shadow = msub.add_parser("shadow", parents=[client, direct], help="mirror a share of unpinned jobs to a version (--off: stop)")
    shadow.add_argument("model")
    shadow.add_argument("version", nargs="?")
    shadow.add_argument("--percent", type=float)
    shadow.add_argument("--off", action="store_true")
    shadow.set_defaults(func=_command, command=shadow_command)

    split = msub.add_parser("split", parents=[client, direct],
                            help="cut a version into pipeline stages NEW-s0, NEW-s1, ... and record the pipeline NEW")
    split.add_argument("target", metavar="NAME[:VERSION|:ALIAS]")
    how = split.add_mutually_exclusive_group(required=True)
    how.add_argument("--stages", type=int, help="how many stages: cut where few tensors cross and FLOPs are balanced")
    how.add_argument("--cut", help="cut after the nodes making these tensors: T1,T2,...")
    split.add_argument("--as", dest="new_name", help="the pipeline's name (default NAME-split)")
    split.set_defaults(func=_command, command=split_command)

    chain = msub.add_parser("chain", parents=[client, direct],
                            help="record a pipeline NAME through different models in order (preprocessing, then a classifier)")
    chain.add_argument("name")
    chain.add_argument("stages", nargs="+", metavar="MODEL[:VERSION|:ALIAS]")
    chain.add_argument("--map", action="append", default=[], metavar="I:INPUT=TENSOR",
                       help="stage I's INPUT comes from TENSOR (an earlier stage's output); default: by name")
    chain.set_defaults(func=_command, command=chain_command)

    remove = msub.add_parser("remove", parents=[client, direct], help="remove a version (or the whole model); its queued jobs fail")
    remove.add_argument("target", metavar="NAME[:VERSION]")
    remove.set_defaults(func=_command, command=remove_command)


def _command(settings: Settings, args: argparse.Namespace) -> int:
    return asyncio.run(args.command(settings, args))


# --- the two ways in: an edge's API, or etcd directly --------------------------------------------------------


async def _via_api(settings: Settings, args: argparse.Namespace, call: Callable[[Any], Awaitable[dict[str, Any]]]) -> dict[str, Any]:
    from inferq.cli import edge_url
    from inferq.client.registry import RegistryClient

    async with RegistryClient(edge_url(settings, args.url), args.api_key) as registry:
        return await call(registry)


async def _via_etcd(settings: Settings, call: Callable[[Any], Awaitable[Any]], store: bool = False) -> dict[str, Any]:
    from inferq.runtime.artifacts import open_store
    from inferq.runtime.coordination import open_etcd
    from inferq.runtime.loader import store_options
    from inferq.runtime.registry import Registry

    artifacts = open_store(settings.registry.store, settings.model_repository, store_options(settings)) if store else None
    async with open_etcd(settings.etcd) as client:
        registry = Registry(client, settings.namespace, settings.etcd.timeout_s, artifacts)
        result = await call(registry)
        if isinstance(result, dict):
            return result
        record = await registry.get(result) if isinstance(result, str) else None
        return json.loads(record.to_json()) if record is not None else {}


def _who(args: argparse.Namespace) -> str:
    from inferq.runtime.registry import identity

    return f"cli:{identity()}"


# --- commands -------------------------------------------------------------------------------------------------


def artifact_files(path: Path) -> list[tuple[Path, str]]:
    """What a push uploads: the model file (as ``model.onnx``) and the external data it names.

    Without the onnx package (a client-only install) a directory's other files all go
    with it, and a lone file alone; the edge refuses a version whose external data is missing.
    """
    if path.is_dir():
        main = path / MODEL_FILE
        if not main.is_file():
            raise ConfigError(f"{path} has no {MODEL_FILE}")
    elif path.is_file():
        main = path
    else:
        raise ConfigError(f"{path} does not exist")
    try:
        from inferq.runtime.repository import external_files

        extra = external_files(main)
    except ImportError:
        extra = sorted(p.name for p in main.parent.iterdir() if p.is_file() and p != main and p.name != "config.toml") \
            if path.is_dir() else []
    return [(main, MODEL_FILE)] + [(main.parent / name, name) for name in extra]


def variant_files(main: Path, config_text: str | None) -> list[tuple[Path, str]]:
    """The ``[variants]`` files the config names that lie beside the model file (and their external data)."""
    if not config_text:
        return []
    import sys

    if sys.version_info >= (3, 11):
        import tomllib
    else:  # Python 3.10 (JetPack 6)
        import tomli as tomllib
    try:
        tables = tomllib.loads(config_text).get("variants") or {}
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"bad config.toml: {exc}") from exc
    names = [t.get("file") for t in tables.values() if isinstance(t, dict) and isinstance(t.get("file"), str)]
    found = []
    for name in names:
        if (main.parent / name).is_file():
            found += [pair for pair in artifact_files(main.parent / name) if pair[1] != MODEL_FILE] + [(main.parent / name, name)]
        else:
            log.warning("%s is not beside %s: this version is pushed without that variant", name, main)
    return found


async def push_command(settings: Settings, args: argparse.Namespace) -> int:
    files = artifact_files(Path(args.path))
    config = Path(args.model_config).read_text() if args.model_config else None
    files += [f for f in variant_files(files[0][0], config) if f[1] not in {n for _, n in files}]
    if args.direct:
        result = await _push_direct(settings, args, files, config)
    else:
        result = await _via_api(settings, args, lambda r: r.push(args.model, files, args.version, config, args.reason))
    state = "pushed" if result["created"] else "unchanged (these bytes are that version already)"
    print(f"{result['model']}:{result['version']} {state}; sha256 {result['sha256']}")
    return 0


async def _push_direct(settings: Settings, args: argparse.Namespace, files: list[tuple[Path, str]],
                       config: str | None) -> dict[str, Any]:
    from inferq.runtime.loader import declare_records
    from inferq.runtime.versions import describe_blobs, materialize
    from inferq.runtime.repository import ModelConfig

    parsed = ModelConfig.parse(config, "config.toml") if config is not None else None
    outcome: dict[str, Any] = {}

    async def push(registry: Any) -> dict[str, Any]:
        blobs = {name: await registry.store.put_file(path) for path, name in files}
        known = await registry.get(args.model)
        variants_from = parsed or (ModelConfig.from_dict(dict(known.config)) if known is not None and known.config else None)
        described = await describe_blobs(registry.store, args.model, blobs, _who(args), variants_from)
        pushed = await registry.register(args.model, args.version, described, parsed, _who(args), args.reason)
        await materialize(registry.store, settings.model_repository, args.model, pushed.version,
                          {n: b.sha256 for n, b in blobs.items()}, config)
        outcome["record"] = await registry.get(args.model)
        return {"model": pushed.model, "version": pushed.version, "created": pushed.created, "sha256": pushed.sha256}

    result = await _via_etcd(settings, push, store=True)
    await declare_records(settings, [outcome["record"]])
    return result


def _target(text: str) -> tuple[str, str | None]:
    name, _, version = text.partition(":")
    return name, version or None


async def pull_command(settings: Settings, args: argparse.Namespace) -> int:
    from inferq.runtime.artifacts import artifact_url, fetch

    model, wanted = _target(args.target)
    from inferq.cli import edge_url
    from inferq.client.registry import RegistryClient

    async with RegistryClient(edge_url(settings, args.url), args.api_key) as registry:
        doc = await registry.model(model)
        version = _resolve(doc, wanted)
        record = _variant(doc["versions"][version], args.variant, f"{model}:{version}")
        files = {MODEL_FILE: (record.get("sha256"), record.get("size"))}
        files.update({f["name"]: (f["sha256"], f["size"]) for f in record.get("files") or []})
        if not files[MODEL_FILE][0]:
            raise InvalidInput(f"{model}:{version} has no recorded sha256 to verify a download against; run 'inferq models sync'")
        directory = Path(args.directory)
        for name, (sha256, size) in files.items():
            await fetch(registry.session, artifact_url(registry.url, model, version, name, args.variant), directory / name,
                        sha256, size)
    shown = f"{model}:{version}" + (f" variant {args.variant}" if args.variant else "")
    print(f"{shown} in {directory} ({len(files)} file(s), sha256 verified)")
    return 0


def _variant(version: dict[str, Any], name: str, what: str) -> dict[str, Any]:
    """The version's document, or that of its variant ``name`` (which has sha256, size and files as a version has)."""
    if not name:
        return version
    for variant in version.get("variants") or []:
        if variant.get("name") == name:
            return variant
    known = [v.get("name") for v in version.get("variants") or []]
    raise InvalidInput(f"{what} has no variant {name!r} (has {known or 'none'})")


def _resolve(doc: dict[str, Any], wanted: str | None) -> str:
    versions, aliases = doc.get("versions") or {}, doc.get("aliases") or {}
    if wanted is None:
        wanted = doc.get("default_version") or ""
    elif wanted in aliases:
        wanted = aliases[wanted].get("version", "")
    if wanted not in versions:
        raise InvalidInput(f"model {doc.get('name')!r} has no version or alias {wanted!r} (versions {sorted(versions)}, "
                           f"aliases {sorted(aliases)})")
    return wanted


async def show_command(settings: Settings, args: argparse.Namespace) -> int:
    doc = await _via_api(settings, args, lambda r: r.model(args.model))
    print(json.dumps(doc, indent=2))
    return 0


async def alias_command(settings: Settings, args: argparse.Namespace) -> int:
    if args.direct:
        from inferq.runtime.plans import KEEP, parse_rule_or_none

        rule = KEEP if args.auto_rollback is None else parse_rule_or_none(args.auto_rollback)

        async def move(registry: Any) -> str:
            await registry.set_alias(args.model, args.alias, args.version, _who(args), args.reason, rule)
            return args.model

        doc = await _via_etcd(settings, move)
    else:
        doc = await _via_api(settings, args, lambda r: r.set_alias(args.model, args.alias, args.version, args.reason,
                                                                   args.auto_rollback))
    return _summary(doc)


async def unalias_command(settings: Settings, args: argparse.Namespace) -> int:
    async def drop(registry: Any) -> str:
        await registry.unalias(args.model, args.alias, _who(args), args.reason)
        return args.model

    doc = await (_via_etcd(settings, drop) if args.direct else _via_api(settings, args, lambda r: r.unalias(args.model, args.alias, args.reason)))
    return _summary(doc)


async def rollback_command(settings: Settings, args: argparse.Namespace) -> int:
    async def back(registry: Any) -> str:
        await registry.rollback(args.model, args.alias, _who(args), args.reason)
        return args.model

    doc = await (_via_etcd(settings, back) if args.direct else _via_api(settings, args, lambda r: r.rollback(args.model, args.alias, args.reason)))
    return _summary(doc)


async def traffic_command(settings: Settings, args: argparse.Namespace) -> int:
    from inferq.runtime.routing import parse_weights

    if args.clear == bool(args.weights):
        raise InvalidInput("give ALIAS=PERCENT weights summing to 100, or --clear")
    weights = {} if args.clear else parse_weights(args.weights)

    async def split(registry: Any) -> str:
        await registry.set_traffic(args.model, weights, _who(args), args.reason)
        return args.model

    doc = await (_via_etcd(settings, split) if args.direct else _via_api(settings, args, lambda r: r.set_traffic(args.model, weights, args.reason)))
    return _summary(doc)


async def shadow_command(settings: Settings, args: argparse.Namespace) -> int:
    if args.off == (args.version is not None):
        raise InvalidInput("give VERSION --percent P, or --off")
    if not args.off and args.percent is None:
        raise InvalidInput("a shadow needs --percent P (0 < P <= 100)")
    version, percent = (None, 0.0) if args.off else (args.version, args.percent)

    async def mirror(registry: Any) -> str:
        await registry.set_shadow(args.model, version, percent, _who(args), args.reason)
        return args.model

    doc = await (_via_etcd(settings, mirror) if args.direct else _via_api(settings, args, lambda r: r.set_shadow(args.model, version, percent, args.reason)))
    return _summary(doc)


async def split_command(settings: Settings, args: argparse.Namespace) -> int:
    """Split a registered version into stages, through an edge's API (``--direct``: etcd and the artifact store)."""
    from inferq.runtime.loader import declare_records
    from inferq.runtime.split import split_into_registry

    model, version = _target(args.target)
    cuts = [t.strip() for t in (args.cut or "").split(",") if t.strip()]
    outcome: dict[str, Any] = {}
    if not args.direct:
        outcome = await _via_api(settings, args, lambda r: r.split(model, version, args.stages, cuts, args.new_name, args.reason))
        _print_split(outcome)
        return 0

    async def split(registry: Any) -> dict[str, Any]:
        outcome.update(await split_into_registry(registry, settings.model_repository, model, version, args.stages, cuts,
                                                 args.new_name, _who(args), args.reason))
        outcome["records"] = [await registry.get(name) for name in [st["model"] for st in outcome["stages"]] + [outcome["pipeline"]]]
        return outcome

    await _via_etcd(settings, split, store=True)
    await declare_records(settings, outcome.pop("records"))
    _print_split(outcome)
    return 0


def _print_split(outcome: dict[str, Any]) -> None:
    print(f"pipeline {outcome['pipeline']} from {outcome['source']}:")
    for st in outcome["stages"]:
        print(f"  {st['model']}:{st['version']}  {', '.join(st['inputs'])} -> {', '.join(st['outputs'])}  "
              f"({st['flops_share']:.0%} of the FLOPs)")


def parse_maps(items: list[str]) -> dict[int, dict[str, str]]:
    """``["1:x=probs", ...]`` as ``{1: {"x": "probs"}}``; InvalidInput for anything else."""
    maps: dict[int, dict[str, str]] = {}
    for item in items:
        index, _, rename = item.partition(":")
        name, _, source = rename.partition("=")
        if not index.isdigit() or not name or not source:
            raise InvalidInput(f"--map {item!r} must be I:INPUT=TENSOR, e.g. 1:x=probs")
        maps.setdefault(int(index), {})[name] = source
    return maps


async def chain_command(settings: Settings, args: argparse.Namespace) -> int:
    """Record a pipeline through registered models (``--direct``: etcd)."""
    from inferq.runtime.loader import declare_records
    from inferq.runtime.split import chain_into_registry

    if not args.direct:
        raise InvalidInput("'models chain' writes to etcd: add --direct (no edge API for it yet)")
    maps = parse_maps(args.map)
    outcome: dict[str, Any] = {}

    async def chain(registry: Any) -> dict[str, Any]:
        outcome.update(await chain_into_registry(registry, args.name, [_target(t) for t in args.stages], maps, _who(args),
                                                 args.reason))
        outcome["record"] = await registry.get(args.name)
        return outcome

    await _via_etcd(settings, chain)
    await declare_records(settings, [outcome.pop("record")])
    print(f"pipeline {outcome['pipeline']}:")
    for st in outcome["stages"]:
        feeds = ", ".join(k if k == v else f"{k}<-{v}" for k, v in st["inputs"].items())
        print(f"  {st['model']}:{st['version']}  {feeds} -> {', '.join(st['outputs'])}")
    return 0


async def remove_command(settings: Settings, args: argparse.Namespace) -> int:
    model, version = _target(args.target)

    async def remove(registry: Any) -> dict[str, Any]:
        from inferq.runtime.versions import dematerialize

        if version:
            await registry.remove_version(model, version, _who(args), args.reason)
        else:
            await registry.remove_model(model, _who(args), args.reason)
        await dematerialize(registry.store, settings.model_repository, model, version)
        return {}

    if args.direct:
        await _via_etcd(settings, remove, store=True)
    else:
        await _via_api(settings, args, lambda r: r.remove(model, version, args.reason))
    what = f"{model}:{version}" if version else f"model {model}"
    print(f"{what} removed; its queued jobs end failed with version_removed once the autoscaler has retired its queues")
    return 0


def _summary(doc: dict[str, Any]) -> int:
    """A few lines about a model: default version, aliases, traffic, shadow."""
    print(f"{doc.get('name')}: default version {doc.get('default_version') or '-'}; versions "
          f"{', '.join(sorted(doc.get('versions') or {}, key=int)) or '-'}")
    for name, alias in sorted((doc.get("aliases") or {}).items()):
        extra = f" (was {alias['previous']})" if alias.get("previous") else ""
        held = f"; {alias['held']}" if alias.get("held") else ""
        rule = "; auto-rollback on" if alias.get("auto_rollback") else ""
        print(f"  alias {name} -> {alias['version']}{extra}{held}{rule}")
    traffic = doc.get("traffic") or {}
    configured = traffic.get("configured", traffic) if isinstance(traffic, dict) else {}
    if configured:
        print("  traffic " + " ".join(f"{k}={v}" for k, v in sorted(configured.items())))
        for note in traffic.get("notes") or []:
            print(f"    {note}")
    shadow = doc.get("shadow")
    if shadow:
        print(f"  shadow -> version {shadow['version']} at {shadow['percent']:g}%")
    return 0
