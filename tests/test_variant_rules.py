"""The rules of model variants and placement: which variant a node runs, which nodes may run a model, where a worker goes.

Pure functions over records (no processes); the process-level tests are in test_agent.py
(an Orin agent runs the tegra234 variant, a host agent the default) and test_registry.py.
"""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from inferq.errors import ConfigError, NoCapacity, NotFound
from inferq.runtime.device import DeviceFacts
from inferq.runtime.records import ModelRecord, NodeRecord, VariantRecord, VersionRecord
from inferq.runtime.repository import ModelConfig, TensorSpec
from inferq.runtime.variants import choose_variant, mismatch, place, unfit
from inferq.runtime.versions import file_map

ORIN = DeviceFacts("jetson", "NVIDIA Jetson AGX Orin Developer Kit", "tegra234", "8.7")
XAVIER = DeviceFacts("jetson", "NVIDIA Jetson Xavier NX Developer Kit", "tegra194", "7.2")
X = (TensorSpec("x", "float32", (None, 4)),)


def node(name: str, facts: DeviceFacts = DeviceFacts(), providers: tuple[str, ...] = ("cpu",), capacity: int = 2,
         workers: int = 0, cached: tuple[str, ...] = ()) -> NodeRecord:
    return NodeRecord(name, providers, capacity, workers, facts=facts, cached=cached)


def variant(name: str, sha: str, **selector: str) -> VariantRecord:
    return VariantRecord(name, selector, sha * 64, 10, f"model-{name}.onnx")


def record(*variants: VariantRecord, require: dict[str, str] | None = None, require_providers: tuple[str, ...] = ()) -> ModelRecord:
    version = VersionRecord(X, X, "d" * 64, 100, variants=variants)
    return ModelRecord("m", "1", {"1": version}, require=require or {}, require_providers=require_providers)


# --- the config -------------------------------------------------------------------------------------------------


def test_variants_and_require_parse_from_the_model_config_and_survive_the_registry_round_trip() -> None:
    config = ModelConfig.parse('require = { provider = "cpu" }\n'
                               '[variants.int8]\nfile = "model-int8.onnx"\nsoc = "tegra234"\n'
                               '[variants.fp16]\nfile = "model-fp16.onnx"\nprovider = "tensorrt"\nkind = "jetson"\n')
    assert list(config.variants) == ["int8", "fp16"], "declaration order is kept"
    assert config.variants["fp16"].selector == {"provider": "tensorrt", "kind": "jetson"}
    assert config.require == {"provider": "cpu"}
    assert ModelConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config


@pytest.mark.parametrize("text, message", [
    ('[variants.int8]\nfile = "model-int8.onnx"\n', "names no device fact"),
    ('[variants.int8]\nfile = "model-int8.onnx"\ngpu = "orin"\n', "unknown device fact"),
    ('[variants.int8]\nsoc = "tegra234"\n', "file must name an .onnx file"),
    ('[variants.int8]\nfile = "model.onnx"\nsoc = "tegra234"\n', "not model.onnx itself"),
    ('[variants.int8]\nfile = "../x.onnx"\nsoc = "tegra234"\n', "file must name"),
    ('[variants.Int8]\nfile = "a.onnx"\nsoc = "tegra234"\n', "a variant name is"),
    ('[variants.a]\nfile = "a.onnx"\nkind = "phone"\n', "kind must be one of"),
    ('[variants.a]\nfile = "a.onnx"\nsoc = 234\n', "must be a non-empty string"),
    ('[variants.a]\nfile = "a.onnx"\nsoc = "t"\n[variants.b]\nfile = "a.onnx"\nsoc = "u"\n', "the same file"),
    ('require = { memory = "8G" }\n', "unknown device fact"),
])
def test_a_variant_or_require_the_system_cannot_honour_is_refused_with_what_is_wrong(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        ModelConfig.parse(text)


# --- selectors against a node's facts ----------------------------------------------------------------------------


def test_a_selector_matches_when_every_fact_it_names_does_and_says_which_one_differs() -> None:
    orin = node("orin", ORIN, ("tensorrt", "cuda", "cpu"))
    assert mismatch({"soc": "tegra234", "cuda_arch": "8.7", "kind": "jetson", "provider": "tensorrt"}, orin) == ""
    assert mismatch({"module": "agx orin"}, orin) == "", "a module is a case-insensitive part of the device-tree model"
    assert mismatch({"soc": "tegra234", "cuda_arch": "7.2"}, orin) == "cuda_arch is '8.7', not '7.2'"
    assert mismatch({"provider": "tensorrt"}, node("host")) == "provider tensorrt not proven (has cpu)"
    assert mismatch({"kind": "host"}, node("host")) == "", "a plain host reads as kind host"
    assert "module" in mismatch({"module": "Xavier"}, orin)


def test_the_most_specific_matching_variant_wins_and_ties_go_to_the_first_declared() -> None:
    int8, fp16, orin_trt = variant("int8", "a", soc="tegra234"), variant("fp16", "b", kind="jetson"), \
        variant("orintrt", "c", soc="tegra234", provider="tensorrt")
    orin_cpu, orin_gpu = node("o1", ORIN), node("o2", ORIN, ("tensorrt", "cpu"))
    assert choose_variant((fp16, int8, orin_trt), orin_cpu) == fp16, "a tie of one fact each: declaration order"
    assert choose_variant((fp16, int8, orin_trt), orin_gpu) == orin_trt, "two facts beat one"
    assert choose_variant((int8, fp16), node("xavier", XAVIER)) == fp16
    assert choose_variant((int8, fp16), node("host")) is None, "no match: the default model.onnx"
    assert choose_variant((), orin_gpu) is None


def test_a_node_fits_a_model_only_with_its_required_providers_and_require_selector() -> None:
    orin = node("orin", ORIN, ("tensorrt", "cpu"))
    assert unfit(orin, {"soc": "tegra234"}, ("tensorrt",)) == ""
    assert unfit(node("host"), {}, ("tensorrt",)) == "lacks required provider(s) ['tensorrt'] (proved cpu)"
    assert unfit(node("xavier", XAVIER), {"soc": "tegra234"}, ()) == "does not meet require: soc is 'tegra194', not 'tegra234'"


def test_a_variants_files_are_its_own_and_an_unknown_variant_is_not_found() -> None:
    version = record(variant("int8", "a", soc="tegra234")).versions["1"]
    assert file_map(version) == {"model.onnx": ("d" * 64, 100)}
    assert file_map(version, "int8") == {"model.onnx": ("a" * 64, 10)}, "served and cached as the variant's model.onnx"
    with pytest.raises(NotFound, match="no variant 'fp16'"):
        file_map(version, "fp16")


def test_version_records_with_variants_round_trip_and_variants_count_as_content() -> None:
    with_variant = record(variant("int8", "a", soc="tegra234"))
    again = ModelRecord.from_json(with_variant.to_json())
    assert again == with_variant and again.versions["1"].variants[0].selector == {"soc": "tegra234"}
    plain = record()
    assert not plain.versions["1"].same_content(with_variant.versions["1"]), "other variant bytes are other content"


# --- placement ----------------------------------------------------------------------------------------------------


def test_placement_prefers_a_variant_match_over_cache_warmth_and_warmth_over_free_room() -> None:
    model = record(variant("int8", "a", soc="tegra234"))
    nodes = {"orin": node("orin", ORIN, capacity=1),
             "warmhost": node("warmhost", capacity=2, workers=1, cached=("d" * 64,)),
             "roomyhost": node("roomyhost", capacity=8)}
    chosen = place(nodes, model, "1")
    assert (chosen.node, chosen.variant, chosen.sha256) == ("orin", "int8", "a" * 64)
    del nodes["orin"]
    assert place(nodes, model, "1").node == "warmhost", "the host that has the default's bytes needs no download"
    assert place(nodes, record(), "1").node == "warmhost"
    nodes["warmhost"] = node("warmhost", capacity=2, workers=1)
    assert place(nodes, model, "1") == place(nodes, record(), "1")
    assert place(nodes, model, "1").node == "roomyhost", "nothing cached anywhere: the most free room"


def test_placement_filters_by_capacity_providers_and_require_and_says_why_each_node_was_passed_over() -> None:
    nodes = {"full": node("full", ORIN, ("tensorrt", "cpu"), capacity=1, workers=1),
             "host": node("host"),
             "xavier": node("xavier", XAVIER, ("tensorrt", "cpu"))}
    with pytest.raises(NoCapacity) as refused:
        place(nodes, record(require={"soc": "tegra234"}, require_providers=("tensorrt",)), "1")
    message = str(refused.value)
    assert "full: full (1/1 workers)" in message
    assert "host: lacks required provider(s) ['tensorrt']" in message
    assert "xavier: does not meet require: soc is 'tegra194', not 'tegra234'" in message
    assert place(nodes, record(require_providers=("tensorrt",)), "1").node == "xavier"
    assert place(nodes, record(), "1", ["tensorrt"]).node == "xavier", "the launcher's own list of required providers"
    with pytest.raises(NoCapacity, match="no edge node has registered"):
        place({}, record(), "1")


# --- storing a version directory, and the local launcher ----------------------------------------------------------


async def test_a_synced_version_directory_stores_the_variants_it_has_and_refuses_one_with_another_signature(tmp_path) -> None:
    import shutil

    import onnx

    from inferq.errors import InvalidInput
    from inferq.runtime.artifacts import FilesystemStore, hash_file
    from inferq.runtime.demo import build_cnn
    from inferq.runtime.versions import stored_version
    from tests.models import write_mlp

    config = ModelConfig.parse('[variants.int8]\nfile = "model-int8.onnx"\nsoc = "tegra234"\n'
                               '[variants.fp16]\nfile = "model-fp16.onnx"\nkind = "jetson"\n')
    directory = write_mlp(tmp_path / "m" / "1", seed=41).parent
    shutil.copy(write_mlp(tmp_path / "int8", seed=42), directory / "model-int8.onnx")
    store = FilesystemStore(tmp_path / "m")
    version = await stored_version(store, directory, "m", "test", config)
    (int8,) = version.variants  # this directory has no model-fp16.onnx: no fp16 variant in this version
    assert (int8.name, int8.selector, int8.file) == ("int8", {"soc": "tegra234"}, "model-int8.onnx")
    assert (int8.sha256, int8.size) == (hash_file(directory / "model-int8.onnx").sha256, (directory / "model-int8.onnx").stat().st_size)
    assert await store.size(int8.sha256) == int8.size, "the variant's bytes are in the store"
    assert (await stored_version(store, directory, "m", "test")).variants == (), "no [variants] in the config: none stored"

    onnx.save(build_cnn(3), str(directory / "model-fp16.onnx"))
    with pytest.raises(InvalidInput, match=r"variant 'fp16' \(model-fp16.onnx\) has inputs \[x:float32\[None, 3, 64, 64\]\]"):
        await stored_version(store, directory, "m", "test", config)


async def test_the_local_launcher_refuses_a_model_whose_require_this_host_does_not_meet(tmp_path) -> None:
    from inferq.actors.launcher import LocalLauncher
    from inferq.settings import Settings
    from tests.jetson import HOST, write_sysroot

    settings = Settings()
    settings = replace(settings, agent=replace(settings.agent, sysroot=str(write_sysroot(tmp_path, HOST))))
    launcher = LocalLauncher(settings, tmp_path / "logs")
    with pytest.raises(NoCapacity, match="does not meet the require of m: kind is 'host', not 'jetson'"):
        await launcher.spawn("m", "1", [], {"kind": "jetson"})
    assert launcher.running == 0, "nothing was started"
