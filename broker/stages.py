"""A pipeline job's route: the stages it goes through, carried in its message from stage to stage.

The edge publishes a pipeline job to its first stage with the route in the
``x-inferq-pipeline`` header; the worker of stage ``i`` publishes the job to stage
``i + 1`` (same job id, the route advanced, the tensors later stages need as its
inputs) before it acks. A stage's inputs are taken by name from what the job
carries (the pipeline's inputs and earlier stages' outputs), renamed by its map.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from inferq.errors import CodecError

ROUTE_HEADER = "x-inferq-pipeline"
STAGE_AT_HEADER = "x-inferq-stage-at-us"  # when this stage's message was published: its own queue_ms counts from it


@dataclass(frozen=True)
class Hop:
    """One stage on the route: its model version and where its inputs come from (stage input -> carried tensor)."""

    model: str
    version: str
    inputs: Mapping[str, str]


@dataclass(frozen=True)
class PipelineRoute:
    """Where a pipeline job is (``index``) and where it goes; ``outputs``: the pipeline outputs the job returns."""

    pipeline: str
    index: int
    hops: tuple[Hop, ...]
    outputs: tuple[str, ...]

    @property
    def hop(self) -> Hop:
        return self.hops[self.index]

    @property
    def last(self) -> bool:
        return self.index == len(self.hops) - 1

    @property
    def stage(self) -> str:
        """The stage's name as job documents and errors show it."""
        return self.hop.model

    def needed_later(self) -> set[str]:
        """The tensors a later stage or the job's outputs still need (what the next message carries)."""
        later = {src for hop in self.hops[self.index + 1:] for src in hop.inputs.values()}
        return later | set(self.outputs)

    def feed(self, carried: Mapping[str, Any]) -> dict[str, Any]:
        """This stage's inputs, renamed from what the job carries; CodecError names a missing one."""
        missing = sorted(src for src in self.hop.inputs.values() if src not in carried)
        if missing:
            raise CodecError(f"pipeline {self.pipeline}: stage {self.stage} needs tensors the job does not carry: {missing}")
        return {name: carried[src] for name, src in self.hop.inputs.items()}

    def advanced(self) -> PipelineRoute:
        return replace(self, index=self.index + 1)

    def to_json(self) -> str:
        return json.dumps({"pipeline": self.pipeline, "index": self.index, "outputs": list(self.outputs),
                           "hops": [{"model": h.model, "version": h.version, "inputs": dict(h.inputs)} for h in self.hops]})

    @classmethod
    def from_json(cls, raw: Any) -> PipelineRoute:
        """The route from its header; CodecError on anything malformed (headers are client-writable)."""
        try:
            doc = json.loads(raw.decode() if isinstance(raw, bytes) else raw)
            hops = tuple(Hop(str(h["model"]), str(h["version"]), {str(k): str(v) for k, v in dict(h["inputs"]).items()})
                         for h in doc["hops"])
            route = cls(str(doc["pipeline"]), int(doc["index"]), hops, tuple(str(o) for o in doc["outputs"]))
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            raise CodecError(f"malformed {ROUTE_HEADER} header: {exc}") from exc
        if not 0 <= route.index < len(route.hops):
            raise CodecError(f"malformed {ROUTE_HEADER} header: stage {route.index} of {len(route.hops)}")
        return route
