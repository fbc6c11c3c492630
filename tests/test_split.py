"""Cutting ONNX models into stages (no broker): each split, run stage after stage, gives the whole model's outputs."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest

from inferq.errors import InvalidInput
from inferq.runtime.demo import build_cnn, build_mlp, build_transformer
from inferq.runtime.split import split_model


def run_whole(model, feed):
    return ort.InferenceSession(model.SerializeToString()).run(None, feed)


def run_stages(stages, feed):
    """Run stage after stage, as the workers do: each takes its inputs by name from what the job carries."""
    carried = dict(feed)
    for stage in stages:
        outs = ort.InferenceSession(stage.model.SerializeToString()).run(list(stage.outputs), {n: carried[n] for n in stage.inputs})
        carried.update(zip(stage.outputs, outs))
    return carried


def feed_for(model, n=4):
    inp = model.graph.input[0]
    shape = [d.dim_value or n for d in inp.type.tensor_type.shape.dim]
    return {inp.name: np.random.default_rng(1).standard_normal(shape).astype(np.float32)}


@pytest.mark.parametrize("build", [build_mlp, build_cnn, build_transformer], ids=["mlp", "cnn", "transformer"])
@pytest.mark.parametrize("k", [2, 3])
def test_every_split_run_stage_by_stage_equals_the_whole_model(build, k) -> None:
    model = build()
    feed = feed_for(model)
    stages = split_model(model, k)
    assert len(stages) == k
    carried = run_stages(stages, feed)
    for out, expected in zip(model.graph.output, run_whole(model, feed)):
        np.testing.assert_allclose(carried[out.name], expected, rtol=1e-5, atol=1e-6)


def test_cuts_go_where_one_tensor_crosses_and_the_flops_are_balanced() -> None:
    # The transformer's residual stream "h" is the one tensor between the attention and the MLP block.
    stages = split_model(build_transformer(), 2)
    assert stages[0].outputs == ("h",) and stages[1].inputs == ("h",)
    # A tensor a later stage needs is passed on even when the stage between does not use it.
    third = split_model(build_transformer(), 3)[2]
    assert "h" in third.inputs


def test_cut_at_named_tensors() -> None:
    stages = split_model(build_mlp(), cut_tensors=["a1"])
    assert [s.outputs for s in stages] == [("a1",), ("probs",)]


def test_impossible_cuts_are_refused_with_the_reason() -> None:
    with pytest.raises(InvalidInput, match="no node of the model makes a tensor named 'nope'"):
        split_model(build_mlp(), cut_tensors=["nope"])
    with pytest.raises(InvalidInput, match="made by the last node"):
        split_model(build_mlp(), cut_tensors=["probs"])
    with pytest.raises(InvalidInput, match="cannot be cut into 9 stages"):
        split_model(build_mlp(), 9)
