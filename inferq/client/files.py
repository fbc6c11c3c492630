"""Inputs and outputs as files for the CLI: ``.npy`` (the model's one input) or ``.npz`` (named inputs)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from inferq.errors import CodecError, ConfigError

OUTPUT_SUFFIX = ".out.npz"


def input_files(directory: Path) -> list[Path]:
    """Every ``.npy`` and ``.npz`` file in ``directory``, by name, leaving out earlier outputs."""
    if not directory.is_dir():
        raise ConfigError(f"{directory} is not a directory")
    return sorted(p for p in directory.iterdir()
                  if p.is_file() and p.suffix in (".npy", ".npz") and not p.name.endswith(OUTPUT_SUFFIX))


def load_inputs(path: Path, single_input: str | None) -> dict[str, np.ndarray]:
    """The named arrays of an ``.npz``, or an ``.npy`` as the model's only input ``single_input``."""
    try:
        if path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as archive:
                return {name: archive[name] for name in archive.files}
        if single_input is None:
            raise ConfigError(f"{path.name}: the model has several inputs; give them as named arrays in an .npz")
        return {single_input: np.load(path, allow_pickle=False)}
    except (OSError, ValueError) as exc:
        raise CodecError(f"cannot read {path}: {exc}") from exc


def parse_input_args(specs: list[str], single_input: str | None) -> dict[str, np.ndarray]:
    """``NAME=FILE.npy`` pairs, or ``FILE.npz`` (its named arrays), merged into one inputs map."""
    inputs: dict[str, np.ndarray] = {}
    for spec in specs:
        name, sep, file = spec.partition("=")
        if sep:
            inputs[name] = load_inputs(Path(file), name)[name] if file.endswith(".npy") else _npz_or_fail(file)
        else:
            inputs.update(load_inputs(Path(spec), single_input))
    if not inputs:
        raise ConfigError("no inputs: give --input NAME=FILE.npy (or FILE.npz), or --inputs-dir DIR")
    return inputs


def _npz_or_fail(file: str) -> np.ndarray:
    raise ConfigError(f"--input NAME=FILE needs a .npy file, not {file!r} (give an .npz without NAME=)")


def output_path(path: Path) -> Path:
    """Where the outputs for the input file ``path`` go: ``<name>.out.npz`` beside it."""
    stem = path.name[: -len(path.suffix)] if path.suffix else path.name
    return path.with_name(stem + OUTPUT_SUFFIX)


def write_outputs(path: Path, outputs: Mapping[str, np.ndarray]) -> Path:
    """Save ``outputs`` as an ``.npz`` at ``path``, whole or not at all."""
    partial = path.with_name(f".{path.name}.{os.getpid()}.part")
    with open(partial, "wb") as out:
        np.savez(out, **outputs)
    partial.replace(path)
    return path


def write_arrays(directory: Path, outputs: Mapping[str, np.ndarray]) -> list[Path]:
    """Save each output as ``<directory>/<name>.npy``."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, array in outputs.items():
        target = directory / f"{name.replace(os.sep, '_')}.npy"
        np.save(target, array)
        paths.append(target)
    return paths
