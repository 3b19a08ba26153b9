"""Write-side rules of fine-tuning, one module per thing they change.

Interfaces (the admin, management commands, the Celery task) call these and nothing
below them; reads are in ``finetune.selectors``. The heavy lifting is plain Python
(``finetune.ml``); these record it in the database.

- ``tickets``: ``ticket_import`` streams a ticket file into ``Ticket`` rows.
- ``datasets``: ``dataset_version_build`` builds and records a ``DatasetVersion``.
- ``training_runs``: request, cancel, reap and execute ``TrainingRun``\\s.
- ``run_monitor``: a running run's log, final status, heartbeat and progress.
- ``model_versions``: promotion and rollback of ``ModelVersion``\\s.
- ``gates``: the checks a candidate must pass to be promoted automatically.
- ``bias``: ``bias_probe_run`` probes a version with counterfactual requests and records
  a ``BiasReport`` (read by the ``bias_probe`` gate).
"""
