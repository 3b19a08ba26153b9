"""Admin pages for tickets, datasets, training runs and model versions, one module each.

Training runs: a "Retrain now" button and form on the list, a run page with a live
progress bar, loss curve (server-rendered SVG, refreshed by a small static script
that polls a JSON endpoint) and a cancel button. Model versions: "Promote" (with the
metrics beside the active version's and the gate results; a failed gate needs a
reason) and "Roll back" / "Restore this version". Every action calls a service.
"""

# Importing the modules registers their ModelAdmins with the default admin site.
from . import datasets, model_versions, tickets, training_runs  # noqa: F401
