"""Cutting one ONNX model into consecutive stages (model sharding, pipeline-style).

A cut after node ``p`` of the (topologically sorted) graph is crossed by every
tensor made at or before ``p`` (or a graph input) that a later node or the graph's
outputs still need. ``choose_cuts`` picks cut points where few tensors cross and
the estimated cost of the stages is balanced; cost is FLOPs estimated from the
inferred shapes (a symbolic batch dimension counts as 1). Each stage is extracted
with :class:`onnx.utils.Extractor`, so it is a real model with only the
initializers it uses. Tensors keep their names across stages: a stage's inputs
are found by name among what earlier stages made and the pipeline's inputs.
"""

from __future__ import annotations

import asyncio
import logging
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from math import prod
from pathlib import Path
from typing import TYPE_CHECKING, Any

from inferq.errors import InvalidInput
from inferq.runtime.records import StageRecord

if TYPE_CHECKING:
    from inferq.runtime.registry import Registry

log = logging.getLogger("inferq.split")

BALANCE_WINDOW = 0.15  # a cut may stray this share of the total cost from its target to save crossing tensors


@dataclass(frozen=True)
class Stage:
    """One extracted stage: its model, the tensors it takes and those it gives on, its estimated share of the cost."""

    model: object  # onnx.ModelProto
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    flops: float


def _dims(value_info: object) -> list[int]:
    shape = value_info.type.tensor_type.shape  # type: ignore[attr-defined]
    return [d.dim_value if d.dim_value > 0 else 1 for d in shape.dim]


def node_flops(model: object) -> list[float]:
    """Estimated FLOPs of each node, from the shapes ONNX shape inference finds (unknown: output elements)."""
    import onnx

    inferred = onnx.shape_inference.infer_shapes(model)
    graph = inferred.graph
    shapes = {v.name: _dims(v) for v in [*graph.input, *graph.value_info, *graph.output]}
    shapes.update({t.name: list(t.dims) for t in graph.initializer})
    costs = []
    for node in graph.node:
        out = shapes.get(node.output[0]) if node.output else None
        elements = float(prod(out)) if out else 1.0
        ins = [shapes.get(name) for name in node.input]
        if node.op_type in ("MatMul", "Gemm") and len(ins) >= 2 and ins[0] and ins[1]:
            k = ins[0][-1] if not (node.op_type == "Gemm" and _attr(node, "transA")) else ins[0][0]
            costs.append(2.0 * elements * k)
        elif node.op_type == "Conv" and len(ins) >= 2 and ins[1]:
            costs.append(2.0 * elements * float(prod(ins[1][1:])))
        else:
            costs.append(elements)
    return costs


def _attr(node: object, name: str) -> int:
    for a in node.attribute:  # type: ignore[attr-defined]
        if a.name == name:
            return int(a.i)
    return 0


def crossing(model: object) -> list[tuple[str, ...]]:
    """For each cut after node ``p`` (p = 0 .. n-2): the tensors that cross it, in a stable order."""
    graph = model.graph  # type: ignore[attr-defined]
    initializers = {t.name for t in graph.initializer}
    made: dict[str, int] = {i.name: -1 for i in graph.input if i.name not in initializers}
    last_use: dict[str, int] = {}
    n = len(graph.node)
    for p, node in enumerate(graph.node):
        for name in node.output:
            made[name] = p
        for name in node.input:
            if name in made:
                last_use[name] = p
    for out in graph.output:
        last_use[out.name] = n  # the pipeline's outputs must reach its end
    # A sweep over the cut positions: a tensor crosses the cuts p with made <= p < last use.
    starting: dict[int, list[str]] = {}
    ending: dict[int, list[str]] = {}
    for name, at in made.items():
        end = last_use.get(name, -1)
        if end > max(at, 0) or (at < 0 and end > 0):
            starting.setdefault(max(at, 0), []).append(name)
            ending.setdefault(end, []).append(name)
    live: dict[str, None] = {}
    cuts = []
    for p in range(n - 1):
        for name in starting.get(p, ()):
            live[name] = None
        for name in ending.get(p, ()):
            live.pop(name, None)
        cuts.append(tuple(live))
    return cuts


def choose_cuts(costs: Sequence[float], crossings: Sequence[tuple[str, ...]], stages: int) -> list[int]:
    """``stages - 1`` cut positions (cut after node p): fewest crossing tensors near each balanced target."""
    n = len(costs)
    if stages < 2:
        raise InvalidInput("a split needs at least 2 stages")
    if n < stages:
        raise InvalidInput(f"the model has {n} nodes; it cannot be cut into {stages} stages")
    total = sum(costs) or 1.0
    cumulative, running = [], 0.0
    for c in costs:
        running += c
        cumulative.append(running)
    cuts: list[int] = []
    for j in range(1, stages):
        low = (cuts[-1] + 1) if cuts else 0
        high = n - 1 - (stages - j)  # leave at least one node for each later stage
        candidates = range(low, high + 1)
        target = total * j / stages
        near = [p for p in candidates if abs(cumulative[p] - target) <= BALANCE_WINDOW * total]
        pool = near or list(candidates)
        cuts.append(min(pool, key=lambda p: (len(crossings[p]) if near else 0, abs(cumulative[p] - target))))
    return cuts


def cuts_at(model: object, tensors: Sequence[str]) -> list[int]:
    """Cut positions after the nodes that make the named tensors (``--cut``), in graph order."""
    producer = {name: p for p, node in enumerate(model.graph.node) for name in node.output}  # type: ignore[attr-defined]
    n = len(model.graph.node)  # type: ignore[attr-defined]
    positions = []
    for name in tensors:
        if name not in producer:
            raise InvalidInput(f"no node of the model makes a tensor named {name!r}")
        if producer[name] >= n - 1:
            raise InvalidInput(f"{name!r} is made by the last node: a cut there would leave an empty stage")
        positions.append(producer[name])
    if len(set(positions)) != len(positions):
        raise InvalidInput("two --cut tensors are made by the same node: the stage between them would be empty")
    return sorted(positions)


def split_model(model: object, stages: int | None = None, cut_tensors: Sequence[str] = ()) -> list[Stage]:
    """The stages of ``model``: ``stages`` chosen by cost and crossing tensors, or cut after ``cut_tensors``."""
    import onnx
    from onnx.utils import Extractor

    costs = node_flops(model)
    crossings = crossing(model)
    positions = cuts_at(model, cut_tensors) if cut_tensors else choose_cuts(costs, crossings, stages or 2)
    graph = model.graph  # type: ignore[attr-defined]
    initializers = {t.name for t in graph.initializer}
    first_inputs = tuple(i.name for i in graph.input if i.name not in initializers)
    bounds = [first_inputs] + [crossings[p] for p in positions] + [tuple(o.name for o in graph.output)]
    extractor = Extractor(onnx.shape_inference.infer_shapes(model))  # stage boundaries need their value infos
    result = []
    starts = [0] + [p + 1 for p in positions]
    ends = [p + 1 for p in positions] + [len(costs)]
    for i, (a, b) in enumerate(zip(starts, ends)):
        outputs = bounds[i + 1]
        made_here = {name for node in graph.node[a:b] for name in node.output}
        # A tensor that only passes by this stage is carried on by the worker, not by the stage's model.
        own_outputs = tuple(name for name in outputs if name in made_here)
        consumed = {name for node in graph.node[a:b] for name in node.input}
        inputs = tuple(name for name in bounds[i] if name in consumed)
        part = extractor.extract_model(list(inputs), list(own_outputs))
        part.ir_version = model.ir_version  # type: ignore[attr-defined]
        onnx.checker.check_model(part)
        result.append(Stage(part, inputs, own_outputs, sum(costs[a:b])))
    return result


async def split_into_registry(registry: Registry, repository: Path, target: str, version: str | None, stages: int | None,
                              cut_tensors: Sequence[str], new_name: str | None, who: str, why: str = "") -> dict[str, Any]:
    """Split a registered version into stages, push each as ``<new>-s<i>``, and record the pipeline ``<new>``.

    Returns ``{"pipeline", "source", "stages": [{model, version, inputs, outputs, flops_share}]}``.
    ``repository`` is where the filesystem store materializes the stages for this host's workers.
    """
    import onnx

    from inferq.runtime.records import VersionRecord
    from inferq.runtime.repository import ModelConfig
    from inferq.runtime.versions import file_map

    record = await registry.get(target)
    if record is None:
        raise InvalidInput(f"model {target!r} is not in the registry")
    if record.pipeline:
        raise InvalidInput(f"{target!r} is a pipeline already; split one of its stages instead")
    v = record.aliases[version].version if version in record.aliases else (version or record.default_version)
    if v not in record.versions:
        raise InvalidInput(f"model {target!r} has no version or alias {version!r}")
    new = new_name or f"{target}-split"
    config = ModelConfig.from_dict(dict(record.config), f"config of {target}") if record.config else None
    with tempfile.TemporaryDirectory(prefix="inferq-split-") as tmp:
        source = Path(tmp) / "source"
        await registry.store.install({n: sha for n, (sha, _) in file_map(record.versions[v]).items()}, source)
        model = await asyncio.to_thread(onnx.load, str(source / "model.onnx"))
        parts = await asyncio.to_thread(split_model, model, stages, cut_tensors)
        pushed = [await _push_stage(registry, repository, Path(tmp), f"{new}-s{i}", part, config, who,
                                    why or f"stage {i} of {target}:{v}") for i, part in enumerate(parts)]
    whole = record.versions[v]
    await registry.set_pipeline(new, tuple(pushed), VersionRecord(whole.inputs, whole.outputs), who, why or f"split of {target}:{v}")
    total = sum(p.flops for p in parts) or 1.0
    described = [{"model": st.model, "version": st.version, "inputs": list(st.inputs), "outputs": list(st.outputs),
                  "flops_share": round(part.flops / total, 3)} for st, part in zip(pushed, parts)]
    log.info("split %s:%s into %s: %s", target, v, new, ", ".join(f"{d['model']} {d['flops_share']:.0%}" for d in described))
    return {"pipeline": new, "source": f"{target}:{v}", "stages": described}


async def _push_stage(registry: Registry, repository: Path, tmp: Path, name: str, part: Stage, config: Any, who: str,
                      why: str) -> StageRecord:
    """Push one stage as a version of model ``name`` (materialized for this host's workers); its stage record."""
    import onnx

    from inferq.runtime.versions import describe_blobs, materialize

    path = tmp / name / "model.onnx"
    path.parent.mkdir()
    await asyncio.to_thread(onnx.save, part.model, str(path))
    blob = await registry.store.put_file(path)
    described = await describe_blobs(registry.store, name, {"model.onnx": blob}, who)
    pushed = await registry.register(name, None, described, config, who, why)
    await materialize(registry.store, repository, name, pushed.version, {"model.onnx": blob.sha256})
    return StageRecord(name, pushed.version, {n: n for n in part.inputs}, part.outputs)


def chain_stages(signatures: Sequence[tuple[str, str, Any]], maps: dict[int, dict[str, str]]) -> tuple[StageRecord, ...]:
    """Stage records chaining different model versions: ``signatures`` are (model, version, VersionRecord) in order.

    Each stage input is taken from ``maps[i][input]`` (a tensor name) if given, else by its own name, among the
    pipeline's inputs (the first stage's) and earlier stages' outputs; InvalidInput names one that nothing gives.
    """
    available = {spec.name: spec for spec in signatures[0][2].inputs}
    stages = []
    for i, (model, version, record) in enumerate(signatures):
        renames = maps.get(i, {})
        unknown = set(renames) - {spec.name for spec in record.inputs}
        if unknown:
            raise InvalidInput(f"--map names inputs {sorted(unknown)} that stage {i} ({model}) does not have")
        inputs = {spec.name: renames.get(spec.name, spec.name) for spec in record.inputs}
        unfit = sorted(f"{spec.name} (from {inputs[spec.name]})" for spec in record.inputs
                       if not _fits(available.get(inputs[spec.name]), spec))
        if unfit:
            raise InvalidInput(f"stage {i} ({model}) needs {unfit}: no pipeline input or earlier stage output of that name "
                               f"has its dtype and shape; available: {sorted(available)} (rename with --map {i}:INPUT=TENSOR)")
        available.update({spec.name: spec for spec in record.outputs})
        stages.append(StageRecord(model, version, inputs, tuple(spec.name for spec in record.outputs)))
    return tuple(stages)


def _fits(source: Any, wanted: Any) -> bool:
    """Whether a tensor described by ``source`` can feed an input described by ``wanted`` (dtype, rank, fixed dims)."""
    if source is None or source.dtype != wanted.dtype:
        return False
    if source.shape is None or wanted.shape is None:
        return True
    return len(source.shape) == len(wanted.shape) and all(
        a is None or b is None or a == b for a, b in zip(source.shape, wanted.shape))


async def chain_into_registry(registry: Registry, name: str, targets: Sequence[tuple[str, str | None]],
                              maps: dict[int, dict[str, str]], who: str, why: str = "") -> dict[str, Any]:
    """Record the pipeline ``name`` through registered model versions in order (``(model, version or alias)``)."""
    from inferq.runtime.records import VersionRecord

    resolved = []
    for model, wanted in targets:
        record = await registry.get(model)
        if record is None or record.pipeline:
            raise InvalidInput(f"{model!r} is not a model in the registry" + (" (it is a pipeline)" if record else ""))
        v = record.aliases[wanted].version if wanted in record.aliases else (wanted or record.default_version)
        if v not in record.versions:
            raise InvalidInput(f"model {model!r} has no version or alias {wanted!r}")
        resolved.append((model, v, record.versions[v]))
    stages = chain_stages(resolved, maps)
    signature = VersionRecord(resolved[0][2].inputs, resolved[-1][2].outputs)
    await registry.set_pipeline(name, stages, signature, who, why or "chain of " + " -> ".join(f"{m}:{v}" for m, v, _ in resolved))
    return {"pipeline": name, "stages": [{"model": st.model, "version": st.version, "inputs": dict(st.inputs),
                                          "outputs": list(st.outputs)} for st in stages]}
