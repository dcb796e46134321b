"""alignscope: predict, watch and prevent alignment collapse during fine-tuning.

The entry points are importable from the top level (``from alignscope import run_diagnose``);
they load on first use so that ``alignscope --version`` does not import torch.
"""

from importlib import import_module
from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("alignscope")
except PackageNotFoundError:  # running from a source tree without installation
    __version__ = "0.0.0+unknown"

# name -> module that defines it
_LAZY = {
    "DiagnoseConfig": "alignscope.commands.diagnose",
    "DiagnoseResult": "alignscope.commands.diagnose",
    "run_diagnose": "alignscope.commands.diagnose",
    "VerifyConfig": "alignscope.commands.verify",
    "run_verify": "alignscope.commands.verify",
    "RankConfig": "alignscope.commands.rank",
    "run_rank": "alignscope.commands.rank",
    "FinetuneConfig": "alignscope.commands.finetune",
    "run_finetune": "alignscope.commands.finetune",
    "make_guard": "alignscope.train.guards",
    "attach_guard": "alignscope.train.guards.trainer",
    "AdaptiveGuard": "alignscope.train.guards",
    "AlignmentCallback": "alignscope.train.watch",
    "AlignmentWatcher": "alignscope.train.watch",
    "load_model": "alignscope.models",
    "load_data": "alignscope.data.loaders",
    "load_organism": "alignscope.organism",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'alignscope' has no attribute {name!r}")
