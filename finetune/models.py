"""Historical tickets, the datasets built from them, training runs and model versions."""

from __future__ import annotations

from django.conf import settings
from django.db import models
from django.db.models import Q
from django.utils import timezone


class Ticket(models.Model):
    """One historical support ticket, imported from a file or another help desk.

    ``source`` + ``external_id`` identify it, so importing the same file again
    updates rather than duplicates. The customer fields are kept only so the
    dataset builder can redact them from the text; they never reach a dataset.
    """

    source = models.CharField(max_length=64, help_text="Import source, e.g. 'bitext', 'sample' or a file name.")
    external_id = models.CharField(max_length=128, help_text="The ticket's id in its source system.")
    subject = models.CharField(max_length=300, blank=True)
    category = models.CharField(max_length=64, blank=True, db_index=True)
    intent = models.CharField(max_length=64, blank=True, db_index=True)
    language = models.CharField(max_length=16, default="en")
    tags = models.JSONField(
        default=list, blank=True, help_text="Language-register tags of the customer's text, e.g. ['P', 'Q', 'Z']."
    )
    customer_segment = models.CharField(
        max_length=64, blank=True, db_index=True, help_text="Customer segment (plan, region…) for bias reports."
    )
    # Language-register segment labels, set on import: from the Bitext tags where the
    # ticket has tags, else by the register detector on the first customer message
    # (finetune.ml.segments). ``segmenter_version`` null: not labelled yet.
    register = models.CharField(max_length=16, blank=True, help_text="Primary register (offensive, typos, …, plain).")
    registers = models.JSONField(default=list, blank=True, help_text="Every register that applies, or ['plain'].")
    register_source = models.CharField(
        max_length=16, blank=True, help_text="'tags' (the source's own register tags) or 'detector'."
    )
    segmenter_version = models.PositiveSmallIntegerField(null=True, blank=True)
    customer_name = models.CharField(max_length=200, blank=True)
    customer_email = models.CharField(max_length=254, blank=True)
    customer_phone = models.CharField(max_length=64, blank=True)
    customer_address = models.TextField(blank=True)
    customer_identifiers = models.JSONField(
        default=list, blank=True, help_text="Order, account or contract numbers of this customer."
    )
    metadata = models.JSONField(default=dict, blank=True)
    created_at = models.DateTimeField(default=timezone.now, help_text="When the ticket was opened at its source.")
    resolved_at = models.DateTimeField(null=True, blank=True)
    imported_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["-created_at", "-id"]
        constraints = [
            models.UniqueConstraint(fields=["source", "external_id"], name="ticket_unique_source_external_id"),
        ]
        indexes = [models.Index(fields=["created_at"], name="ticket_created_idx")]

    def __str__(self) -> str:
        return f"{self.source}:{self.external_id} {self.subject or self.intent}".strip()


class TicketMessage(models.Model):
    """One turn of a ticket thread, in order."""

    class Role(models.TextChoices):
        CUSTOMER = "customer", "Customer"
        AGENT = "agent", "Agent"

    ticket = models.ForeignKey(Ticket, on_delete=models.CASCADE, related_name="messages")
    role = models.CharField(max_length=16, choices=Role.choices)
    body = models.TextField()
    position = models.PositiveIntegerField()
    sent_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["ticket", "position"]
        constraints = [
            models.UniqueConstraint(fields=["ticket", "position"], name="ticketmessage_unique_position"),
        ]

    def __str__(self) -> str:
        return f"{self.get_role_display()} #{self.position} of ticket {self.ticket_id}"


class DatasetVersion(models.Model):
    """A fine-tuning dataset written to disk by ``build_dataset``: where, what, and by whom."""

    name = models.CharField(max_length=100, unique=True)
    path = models.CharField(max_length=500, help_text="Directory written by datasets' save_to_disk.")
    content_hash = models.CharField(max_length=64, db_index=True)
    tokenizer = models.CharField(max_length=300, blank=True, help_text="Base model whose tokenizer built the masks.")
    num_train = models.PositiveIntegerField(default=0)
    num_validation = models.PositiveIntegerField(default=0)
    params = models.JSONField(default=dict, blank=True, help_text="Build parameters: since, seed, fractions…")
    card = models.JSONField(default=dict, blank=True, help_text="Counts, percentiles, redactions and drops.")
    created_by = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL)
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["-created_at", "-id"]

    def __str__(self) -> str:
        return f"{self.name} ({self.num_train} train / {self.num_validation} val)"


class TrainingRun(models.Model):
    """One LoRA fine-tuning run, from the admin's click to its evaluated adapter."""

    class Status(models.TextChoices):
        QUEUED = "queued", "Queued"
        RUNNING = "running", "Running"
        SUCCEEDED = "succeeded", "Succeeded"
        FAILED = "failed", "Failed"
        CANCELLED = "cancelled", "Cancelled"

    LIVE_STATUSES = (Status.QUEUED, Status.RUNNING)
    DEFAULT_LANE = "default"

    status = models.CharField(max_length=16, choices=Status.choices, default=Status.QUEUED, db_index=True)
    lane = models.CharField(
        max_length=32, default=DEFAULT_LANE, help_text="At most one queued or running run per lane (a DB constraint)."
    )
    dataset_version = models.ForeignKey(
        DatasetVersion, null=True, blank=True, on_delete=models.PROTECT, related_name="training_runs"
    )
    build_fresh_dataset = models.BooleanField(default=False, help_text="Build a new dataset before training.")
    base_model = models.CharField(max_length=300, blank=True, help_text="Resolved base model (id or path).")
    hyperparameters = models.JSONField(default=dict, blank=True)
    progress = models.FloatField(default=0.0, help_text="0 to 1.")
    current_step = models.PositiveIntegerField(default=0)
    total_steps = models.PositiveIntegerField(default=0)
    current_epoch = models.FloatField(default=0.0)
    loss_history = models.JSONField(default=list, blank=True, help_text="[{step, epoch, loss}, …]")
    phase = models.JSONField(
        default=dict,
        blank=True,
        help_text="What the run does now: {name, text, done, total} (the phase's own progress).",
    )
    eval_metrics = models.JSONField(default=dict, blank=True)
    log_tail = models.TextField(blank=True)
    error = models.TextField(blank=True)
    output_dir = models.CharField(max_length=500, blank=True)
    celery_task_id = models.CharField(max_length=64, blank=True)
    cancel_requested = models.BooleanField(default=False)
    requested_by = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL)
    created_at = models.DateTimeField(default=timezone.now)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)
    heartbeat_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at", "-id"]
        constraints = [
            models.UniqueConstraint(
                fields=["lane"],
                condition=Q(status__in=["queued", "running"]),
                name="trainingrun_one_live_run_per_lane",
            ),
        ]
        permissions = [("retrain_model", "Can trigger retraining")]

    def __str__(self) -> str:
        return f"Run #{self.pk} ({self.get_status_display()})"

    @property
    def is_live(self) -> bool:
        return self.status in self.LIVE_STATUSES


class ModelVersion(models.Model):
    """A trained adapter that can serve customers. Exactly one is active at a time."""

    class Status(models.TextChoices):
        CANDIDATE = "candidate", "Candidate"
        ACTIVE = "active", "Active"
        RETIRED = "retired", "Retired"

    number = models.PositiveIntegerField(unique=True)
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.CANDIDATE, db_index=True)
    training_run = models.OneToOneField(
        TrainingRun, null=True, blank=True, on_delete=models.SET_NULL, related_name="model_version"
    )
    dataset_version = models.ForeignKey(
        DatasetVersion, null=True, blank=True, on_delete=models.PROTECT, related_name="model_versions"
    )
    base_model = models.CharField(max_length=300)
    adapter_path = models.CharField(max_length=500)
    merged_path = models.CharField(max_length=500, blank=True)
    metrics = models.JSONField(default=dict, blank=True)
    gate_results = models.JSONField(default=dict, blank=True)
    notes = models.TextField(blank=True)
    created_at = models.DateTimeField(default=timezone.now)
    promoted_at = models.DateTimeField(null=True, blank=True)
    promoted_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    retired_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-number"]
        constraints = [
            models.UniqueConstraint(fields=["status"], condition=Q(status="active"), name="modelversion_one_active"),
        ]
        permissions = [("promote_modelversion", "Can promote or roll back model versions")]

    def __str__(self) -> str:
        return f"{self.label} ({self.get_status_display()})"

    @property
    def label(self) -> str:
        return f"v{self.number}"


class ModelVersionEvent(models.Model):
    """Audit log of promotions, rollbacks and gate overrides: who, when, why."""

    class Action(models.TextChoices):
        PROMOTED = "promoted", "Promoted"
        ROLLED_BACK = "rolled_back", "Rolled back"
        RETIRED = "retired", "Retired"

    version = models.ForeignKey(ModelVersion, on_delete=models.CASCADE, related_name="events")
    action = models.CharField(max_length=16, choices=Action.choices)
    previous = models.ForeignKey(ModelVersion, null=True, blank=True, on_delete=models.SET_NULL, related_name="+")
    actor = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL)
    automatic = models.BooleanField(default=False)
    gates_overridden = models.BooleanField(default=False)
    reason = models.TextField(blank=True)
    gate_results = models.JSONField(default=dict, blank=True)
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["-created_at", "-id"]

    def __str__(self) -> str:
        return f"{self.version.label} {self.get_action_display().lower()} at {self.created_at:%Y-%m-%d %H:%M}"


class BiasReport(models.Model):
    """What the counterfactual probes found for one model version (``services/bias.bias_probe_run``).

    The same requests in every register and with names and pronouns across genders and
    origins were answered by the version; ``report`` holds per group and measure the
    paired gap with its interval, the test and the decision, the worst groups with
    example replies, and the failure lines (``finetune.ml.probes.BiasProbeReport``).
    ``status``: running (recorded when a training run creates the version, so nobody
    promotes it before its probe is done), pass, fail, insufficient (too few requests
    for a verdict) or error (the probe could not run: ``error`` says why). The latest
    report of a version is the one its promotion gate reads.
    """

    class Status(models.TextChoices):
        RUNNING = "running", "Running"
        PASS = "pass", "Pass"
        FAIL = "fail", "Fail"
        INSUFFICIENT = "insufficient", "Too few requests"
        ERROR = "error", "Could not run"

    version = models.ForeignKey(ModelVersion, on_delete=models.CASCADE, related_name="bias_reports")
    status = models.CharField(max_length=16, choices=Status.choices)
    failures = models.JSONField(default=list, blank=True, help_text="One line per flagged group and measure.")
    report = models.JSONField(default=dict, blank=True, help_text="BiasProbeReport.to_dict().")
    settings = models.JSONField(default=dict, blank=True, help_text="Requests, reply length, thresholds, seed.")
    error = models.TextField(blank=True)
    trigger = models.CharField(max_length=32, blank=True, help_text="'training_run', 'command' or 'admin'.")
    duration_s = models.FloatField(null=True, blank=True)
    created_at = models.DateTimeField(default=timezone.now, db_index=True)

    class Meta:
        ordering = ["-created_at", "-id"]

    def __str__(self) -> str:
        return f"Bias report of {self.version.label}: {self.get_status_display()}"

    @property
    def passed(self) -> bool:
        return self.status == self.Status.PASS
