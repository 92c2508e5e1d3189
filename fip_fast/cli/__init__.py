"""``fip-fast``: command-line entry points.

``fip-fast demo``
    The whole story on the bundled MNIST-5k digits in well under two minutes on two CPU cores: split the data
    into train / clean validation (the defender's small clean set) / test, train a backdoored demo CNN
    (``--attack``, BadNets by default; cached by configuration so a re-run starts at purification), report its
    ACC / ASR / RA, purify it with Fast FIP, FIP and a plain fine-tuning control (the same loop with the
    suppressor and the anchor switched off), print a table (ACC, ASR, RA, λ_max, wall time, trainable
    parameters) and write a report folder (Markdown, JSON, PNG plots).

``fip-fast purify``
    Purify your own model: an architecture (registry name or ``module:factory``), a checkpoint (safetensors or a
    weights-only ``.pt``; a pickled module is refused), clean data (``.npz`` or image folder), optionally clean
    test data and triggered test data (for reporting only — never for selection).  Writes the purified weights
    (safetensors) and the same report folder.  ``--distributed ddp`` under ``torchrun`` runs it data-parallel:
    ``torchrun --nproc_per_node=2 -m fip_fast.cli purify --distributed ddp …`` (same result as one process).

Every flag is documented in ``fip-fast <command> --help``.

File safety (the checkpoint is untrusted, the user's files are precious): every flag and the output locations
are checked before any work (usage errors: one line, exit status 2); an existing non-empty ``--out`` is refused
unless ``--overwrite``, which replaces only the tool's own output names
(:data:`fip_fast.cli.checks.OUTPUT_NAMES`), never an input and never anything else; all outputs are staged
beside their destinations and replace the previous ones only once every one is complete
(:class:`fip_fast.io.StagedOutputs`) and the folder is locked for the run (:class:`fip_fast.io.FolderLock`: a
second run into it fails at once); a diverged purification (non-finite values, or most steps skipped) or one whose
clean accuracy fell by more than 10 points (:data:`fip_fast.pipeline.report.ACCURACY_DROP_LIMIT`, unless
``--accept-accuracy-drop``) writes its report but no model and exits with status 3
(:data:`fip_fast.cli.checks.EXIT_NOT_SAVED`), as does a failed write (one line naming the file).  Every error is
one line.  docs/own-model.md walks through purifying your own model.

The modules, one job each:

* :mod:`~fip_fast.cli.entry` — :func:`main` (parse, run, exit status);
* :mod:`~fip_fast.cli.parser` — :func:`build_parser`: every flag and its help text;
* :mod:`~fip_fast.cli.demo` — ``fip-fast demo`` (:data:`DEMO_DEFAULTS`, the backdoored-model cache);
* :mod:`~fip_fast.cli.purify_cmd` — ``fip-fast purify`` and the torchrun / ``--distributed`` set-up;
* :mod:`~fip_fast.cli.inputs` — loading and checking ``purify``'s checkpoint and data;
* :mod:`~fip_fast.cli.checks` — flag values, output safety, optional extras, the divergence rule,
  :class:`CLIError` and the exit statuses;
* :mod:`~fip_fast.cli.render` — the result table and rows, report.md / report.json and the staged writing;
* :mod:`~fip_fast.cli.plots` — the PNG plots (matplotlib); :mod:`~fip_fast.cli.measure` — λ_max.

``fip-fast demo`` needs the optional dependencies ``pip install "fip_fast[demo]"`` (mlxtend, matplotlib) and
says so before any work when they are missing; ``fip-fast purify`` without matplotlib writes its report without
plots.
"""
from fip_fast.cli.checks import CLIError
from fip_fast.cli.demo import DEMO_DEFAULTS
from fip_fast.cli.entry import main
from fip_fast.cli.parser import build_parser

__all__ = ["main", "build_parser", "DEMO_DEFAULTS", "CLIError"]
