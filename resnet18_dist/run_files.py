"""The file names of a run directory, besides its checkpoint_*/ directories.

On the ground floor, so that everything that reads runs (compare, the sweep, the commands, the
benchmarks) names them from here; what a run directory means (plans, resume, moving aside) stays
in ``engine/rundir.py``.
"""

from __future__ import annotations

from resnet18_dist.model_meta import MODEL_PT

CONFIG_FILE = "config.yaml"
RUN_INFO_FILE = "run_info.json"
METRICS_FILE = "metrics.jsonl"
# The best epoch's weights as a self-describing model file: the same format, and name, as an
# export's model.pt.
BEST_MODEL_FILE = MODEL_PT
REPORT_FILE = "report.json"  # written last: its presence marks a finished run
