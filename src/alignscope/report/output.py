"""Output directories written atomically, and the environment every result records."""

from __future__ import annotations

import json
import os
import platform
import shutil
import sys
import tempfile
from dataclasses import fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from alignscope import distributed as dist

if TYPE_CHECKING:
    from alignscope.geometry import Subspace


def environment() -> dict[str, str]:
    """Versions and machine, recorded in every results file."""
    import transformers

    from alignscope import __version__

    return {
        "alignscope": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "torch_threads": str(torch.get_num_threads()),
        # TF32 matmuls change float32 results at the 1e-3 level on Ampere+ GPUs: recorded so a
        # CUDA run's numbers can be told apart from strict float32 ones.
        "tf32_matmul": str(torch.backends.cuda.matmul.allow_tf32),
        "tf32_cudnn": str(torch.backends.cudnn.allow_tf32),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none",
        # data-parallel processes (torchrun) and their backend; "1" / "none" in one process
        "world_size": str(dist.world_size()),
        "dist_backend": str(dist.describe()["backend"] or "none"),
    }


def results_header(
    schema: str,
    config: Any,
    env: dict[str, str] | None = None,
    argv: list[str] | None = None,
) -> dict[str, Any]:
    """What every results.json opens with: schema, config (a command config of specs, written
    flat), seed, the process's command line (``argv``, which the reports show) and environment
    (``env`` and ``argv``: the ones a result recorded, else this process')."""
    flat = config.flat()
    return {
        "schema": schema,
        "config": flat,
        "seed": flat["seed"],
        "argv": list(sys.argv) if argv is None else argv,
        "environment": environment() if env is None else env,
    }


def jsonable(obj: Any) -> Any:
    """Tensors, arrays and paths to JSON types; NaN and inf to None (JSON has neither)."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [jsonable(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        return jsonable(obj.tolist())
    if isinstance(obj, np.ndarray | np.generic):
        return jsonable(obj.tolist())
    if isinstance(obj, float) and (obj != obj or obj in (float("inf"), float("-inf"))):
        return None  # JSON has no NaN/inf; None reads as "not available"
    if isinstance(obj, Path):
        return str(obj)
    return obj


def _replace_atomically(path: str | Path, write) -> None:
    """Write through a temporary file in the same folder and a rename, so a reader never sees
    half a file. ``write(tmp_path)`` produces the content."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write text atomically (see :func:`_replace_atomically`)."""
    _replace_atomically(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def write_json_atomic(path: str | Path, data: Any) -> None:
    """Write JSON atomically; NaN/inf become null."""
    text = json.dumps(jsonable(data), indent=2, allow_nan=False) + "\n"
    write_text_atomic(path, text)


def save_torch_atomic(path: str | Path, obj: Any) -> None:
    """``torch.save`` atomically (load with ``weights_only=True``)."""
    _replace_atomically(path, lambda tmp: torch.save(obj, tmp))


SUBSPACE_FILE = "subspace.pt"
_SUBSPACE_FORMAT = "alignscope.subspace/2"


def save_subspace(path: str | Path, subspace: Subspace) -> None:
    """The alignment subspace (eigenpairs, trace, solver record) for later runs
    (``verify --diagnosis``, ``rank`` reusing it); read back by :func:`load_subspace`."""
    state = {f.name: getattr(subspace, f.name) for f in fields(subspace)}
    save_torch_atomic(path, {"format": _SUBSPACE_FORMAT, **state})


def load_subspace(path: str | Path) -> Subspace:
    """The :class:`~alignscope.geometry.Subspace` saved by :func:`save_subspace`.

    Also reads the earlier layout (``{"basis": [P, d], "values": [d]}``, no trace or solver
    record): its trace is then the sum of the values and its method ``"unknown"``.
    """
    from alignscope.geometry import Subspace

    state = torch.load(path, weights_only=True)
    if state.get("format") == _SUBSPACE_FORMAT:
        return Subspace(**{k: v for k, v in state.items() if k != "format"})
    if {"basis", "values"} <= set(state):
        values = state["values"]
        return Subspace(values, state["basis"], float(values.sum()), None, "unknown")
    raise ValueError(f"{path}: not a subspace file written by alignscope")


class OutputDir:
    """A results directory built in a hidden staging folder and moved into place at the end.

    An existing non-empty ``--out`` is never overwritten unless ``overwrite`` is set; a run that
    fails leaves nothing half-written at ``path``.
    """

    def __init__(self, path: str | Path, overwrite: bool = False) -> None:
        self.path = Path(path)
        if self.path.exists() and any(self.path.iterdir()) and not overwrite:
            raise FileExistsError(
                f"{self.path} already holds results; choose another --out or pass --overwrite"
            )
        self.overwrite = overwrite
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.staging = Path(tempfile.mkdtemp(dir=self.path.parent, prefix=f".{self.path.name}."))

    def file(self, name: str) -> Path:
        return self.staging / name

    def commit(self) -> Path:
        """Move the staged results into place; an old folder is kept until the move succeeds."""
        backup = None
        if self.path.exists():
            backup = self.path.with_name(f".{self.path.name}.old-{os.getpid()}")
            os.replace(self.path, backup)
        try:
            os.replace(self.staging, self.path)
        except OSError as err:
            if backup is not None:
                os.replace(backup, self.path)
            raise OSError(
                f"could not move the results into {self.path} ({err}); they are in {self.staging}"
            ) from err
        if backup is not None:
            shutil.rmtree(backup, ignore_errors=True)
        return self.path

    def abort(self) -> None:
        shutil.rmtree(self.staging, ignore_errors=True)

    def __enter__(self) -> OutputDir:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.abort()
