"""Model families (DESIGN.md §9): the registry, and what a checkpoint is.

``recognise(path)`` reads a safetensors header and says what the file is (the main checkpoint of a family, or a
companion such as a VAE or a text encoder); ``family(name)`` gives the :class:`~.base.Family` that builds window
generators for it. Families live one per module in this package; the job never names one.
"""

from __future__ import annotations

import importlib
from functools import lru_cache
from pathlib import Path
from typing import Mapping

from ..model.loading import CheckpointError, read_header
from .base import Family, Recognition
from .components import recognise_component

FAMILY_NAMES = ("omnisync", "humo", "latentsync", "infinitetalk")


class UnknownModelError(CheckpointError):
    """A safetensors file that fits no family and no companion we know."""


@lru_cache(maxsize=None)
def _module_family(name: str) -> "Family | None":
    try:
        module = importlib.import_module(f"{__name__}.{name}")
    except ModuleNotFoundError as error:
        if error.name == f"{__name__}.{name}":
            return None
        raise
    return module.FAMILY


def families() -> dict[str, Family]:
    """Every family this install knows, by name, in the order they are tried."""
    return {name: fam for name in FAMILY_NAMES if (fam := _module_family(name)) is not None}


def family(name: str) -> Family:
    known = families()
    if name not in known:
        raise CheckpointError(f"unknown model family {name!r}; known: {', '.join(known)}")
    return known[name]


def known_line() -> str:
    """One line naming what this install recognises."""
    names = ", ".join(f"{fam.title} ({fam.name})" for fam in families().values())
    return (f"it fits none of the model families this version knows: {names}; nor a companion file (Wan or SD VAE, "
            f"Whisper, wav2vec2, umT5, CLIP vision, InfiniteTalk patch)")


def recognise_tensors(tensors: Mapping, metadata: Mapping[str, str], name: str = "this file") -> Recognition:
    """What a header (``name -> TensorInfo`` or shapes, and metadata) is: a family's main checkpoint first, then a
    shared companion. Raises :class:`UnknownModelError` with one line otherwise."""
    for fam in families().values():
        found = fam.recognise(tensors, metadata)
        if found is not None:
            return found
    found = recognise_component(tensors, metadata)
    if found is not None:
        return found
    raise UnknownModelError(f"{name} ({len(tensors)} tensors) is not a model OmniSync can use: {known_line()}.")


def recognise(path) -> Recognition:
    """What the safetensors file at ``path`` is, from its header alone (milliseconds for any size)."""
    tensors, metadata = read_header(path)
    return recognise_tensors(tensors, metadata, Path(path).name)


def family_of(recognition: Recognition) -> Family:
    """The family whose main checkpoint ``recognition`` is (a companion alone cannot run a job)."""
    if recognition.role == "model" and recognition.family not in families():
        raise CheckpointError(f"{recognition.label} is recognised, but this version cannot run the "
                              f"{recognition.family} family yet (its window generator is not built); families that "
                              f"run: {', '.join(families())}")
    if recognition.role != "model" or recognition.family is None:
        raise CheckpointError(f"{recognition.label} is a {recognition.role.replace('_', ' ')}, not a lip-sync model:"
                              f" give it with its flag and the model with --model")
    return family(recognition.family)


__all__ = ["FAMILY_NAMES", "Family", "Recognition", "UnknownModelError", "families", "family", "family_of",
           "known_line", "recognise", "recognise_tensors"]
