"""
``python -m monai_mlbseg demo``: the left-atrium bundle (``bundles/mlbseg_la``) end to end on a generated
left-atrium-like data set, on a laptop CPU.

It writes synthetic volumes in the UA-MT HDF5 layout (the real loaders read them; the anatomy ``"la_demo"`` of
:py:data:`~monai_mlbseg.data.ANATOMIES` by default) and the demo's split of them as a datalist, writes the bundle
(from the package's bundle template, the same files as ``bundles/mlbseg_la``) to ``<out>/bundle``, and runs the
bundle's own workflows through :py:class:`monai.bundle.ConfigWorkflow` with small sizes as overrides: the training
workflow step by step (data check, stage 1, bootstrap, stage 2), and the evaluation workflow on the held-out volumes
after stage 1 and after stage 2. It writes metrics, figures and a ``report.md``.
Every step is resumable as the bundle's are: rerunning the same command after an interruption reuses stage 1 and
the initial labels, and stage 2 continues from its last checkpoint.

The demo reads data -> run -> report: :py:class:`DemoConfig` (the options, sizes resolved), the data split
(:py:func:`~monai_mlbseg.data.folder_split` / :py:func:`~monai_mlbseg.data.synthetic_split`), the recipe's
:py:class:`~monai_mlbseg.recipe.TrainingRun` and :py:func:`~monai_mlbseg.recipe.train_matched_control`, the bundle's
evaluation workflow, and :py:class:`DemoReport`, which writes the markdown. :py:func:`run_demo` returns the report's
path; the command line prints.
"""

from .config import QUICK, SIZES, DemoConfig
from .report import CONTROL_NAME, DemoReport
from .run import demo, run_demo

__all__ = ["CONTROL_NAME", "QUICK", "SIZES", "DemoConfig", "DemoReport", "demo", "run_demo"]
