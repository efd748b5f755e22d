"""Finding a job's files where artists keep them: a ComfyUI ``models/`` folder (``--models-dir``), each companion
in its standard subfolder (:data:`~.base.FOLDERS`), recognised by its header, not by its name."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Optional

from ..errors import InputError
from ..model.loading import CheckpointError, resolve_model_path
from . import UnknownModelError, family_of, recognise
from .base import FOLDERS, Companion, Family, ModelFiles, Recognition


@dataclass
class ModelIndex:
    """Every safetensors file under the role subfolders of ``root`` with what it is (unreadable or unknown files
    are listed in ``skipped`` with the reason)."""

    root: Path
    found: dict[Path, Recognition] = field(default_factory=dict)
    skipped: dict[Path, str] = field(default_factory=dict)

    @classmethod
    def scan(cls, root) -> "ModelIndex":
        root = Path(root).expanduser()
        if not root.is_dir():
            raise InputError(f"--models-dir is not a folder: {root}")
        index = cls(root.resolve())
        folders = dict.fromkeys(f for names in FOLDERS.values() for f in names)
        for folder in folders:
            for path in sorted((index.root / folder).rglob("*.safetensors")) if (index.root / folder).is_dir() else []:
                if path in index.found or path in index.skipped:
                    continue
                try:
                    index.found[path] = recognise(path)
                except CheckpointError as error:
                    index.skipped[path] = str(error)
        return index

    def candidates(self, companion: Companion) -> list[Path]:
        """Files that fill ``companion``, in its subfolders first, in the order of its accepted kinds."""
        ranked = []
        for path, found in self.found.items():
            if found.role == companion.role and found.kind in companion.kinds:
                folder = path.relative_to(self.root).parts[0]
                in_usual = folder in companion.folders
                ranked.append((companion.kinds.index(found.kind), not in_usual, path.name != companion.usual_file,
                               str(path), path))
        return [r[-1] for r in sorted(ranked)]

    def model(self, name: str) -> Path:
        """A main checkpoint named ``name`` (relative to a model subfolder) inside this folder."""
        roots = [self.root / f for f in FOLDERS["model"] if (self.root / f).is_dir()] + [self.root]
        return resolve_model_path(name, roots)


def _check_companion(path: Path, companion: Companion, model: Recognition) -> Path:
    found = recognise(path)
    if found.role != companion.role or found.kind not in companion.kinds:
        raise InputError(f"{path.name} is {found.label} ({found.role.replace('_', ' ')}); {model.label} needs "
                         f"for {companion.flag} a {companion.usual_file}-like file")
    return path


def resolve_files(model: Optional[str], models_dir: Optional[str] = None, given: Optional[Mapping[str, str]] = None,
                  default_model: Optional[Path] = None, notes: Optional[list] = None) -> tuple[Family, ModelFiles]:
    """The family and files of a job. ``model``: a file path or, with ``models_dir``, a name inside it (default
    ``default_model``); ``given``: role -> path named on the command line (checked to be the right kind);
    companions not given are looked for under ``models_dir``. ``notes`` collects which file was picked where
    several fit. Raises one clear error for a missing or wrong file."""
    given = {k: v for k, v in (given or {}).items() if v}
    index = ModelIndex.scan(models_dir) if models_dir else None
    if model is None:
        if default_model is None:
            raise InputError("no --model given")
        path = Path(default_model)
    elif Path(model).expanduser().is_file():
        path = Path(model).expanduser()
    elif index is not None:
        path = index.model(model)
    else:
        raise InputError(f"model not found: {model}")
    recognition = recognise(path)
    if recognition.role != "model" and recognition.family is not None:
        raise InputError(f"{path.name} is {recognition.label}, a {recognition.role}: give it with its flag and the "
                         f"model with --model")
    family = family_of(recognition)
    files = ModelFiles(path, recognition)
    for companion in family.companion_roles(files):
        if companion.role in given:
            chosen = Path(given[companion.role]).expanduser()
            if not chosen.is_file():
                raise InputError(f"{companion.flag} file not found: {chosen}")
            files.companions[companion.role] = _check_companion(chosen, companion, recognition)
            continue
        options = index.candidates(companion) if index is not None else []
        if options:
            files.companions[companion.role] = options[0]
            if len(options) > 1 and notes is not None:
                notes.append(f"{companion.role.replace('_', ' ')}: using {options[0].name} "
                             f"(also found: {', '.join(p.name for p in options[1:])}; pick one with {companion.flag})")
        elif companion.required:
            where = f" nor under {index.root}/{companion.folders[0]}/" if index is not None else \
                " (or pass --models-dir, a ComfyUI models folder)"
            raise InputError(f"{recognition.label} needs {companion.usual_file} ({companion.role.replace('_', ' ')}):"
                             f" not given with {companion.flag}{where}")
    return family, files


__all__ = ["ModelIndex", "UnknownModelError", "resolve_files"]
