"""Forms of the fine-tuning admin pages: the "Retrain now" form and the promotion form.

They only parse input; the services decide what is allowed (ranges, one live run,
gates) and their ApplicationError messages are shown on the form.
"""

from __future__ import annotations

from django import forms

from .models import DatasetVersion
from .selectors import dataset_versions_recent
from .services.training_runs import training_settings_requestable

LATEST = "latest"
FRESH = "fresh"
# The per-run settings this form offers (the service lists every requestable one; the
# rest keep their defaults), and labels where the setting's name reads badly.
FORM_SETTINGS = ("epochs", "learning_rate", "lora_r", "max_examples")
LABELS = {"lora_r": "LoRA rank"}


class RetrainForm(forms.Form):
    dataset = forms.ChoiceField(label="Dataset", help_text="Train on an existing dataset version or build a new one.")
    auto_promote = forms.BooleanField(
        required=False,
        initial=True,
        label="Promote automatically if it passes the gates",
        help_text="Otherwise the new version waits as a candidate for someone to promote it.",
    )

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        for setting in training_settings_requestable():
            if setting.name in FORM_SETTINGS:
                field = forms.IntegerField if setting.type is int else forms.FloatField
                self.fields[setting.name] = field(
                    label=LABELS.get(setting.name),
                    required=setting.default is not None,
                    initial=setting.default,
                    help_text=setting.help,
                )
        self.order_fields(["dataset", *FORM_SETTINGS, "auto_promote"])
        versions = dataset_versions_recent(limit=50)
        choices = []
        if versions:
            choices.append((LATEST, f"Newest dataset ({versions[0].name})"))
        choices.append((FRESH, "Build a fresh dataset from the tickets"))
        choices.extend((str(v.pk), str(v)) for v in versions)
        self.fields["dataset"].choices = choices
        self.fields["dataset"].initial = LATEST if versions else FRESH

    def request_arguments(self) -> dict:
        """Keyword arguments for ``training_run_request``."""
        data = self.cleaned_data
        choice = data["dataset"]
        dataset = None
        if choice not in {LATEST, FRESH}:
            dataset = DatasetVersion.objects.get(pk=int(choice))
        return {
            "dataset_version": dataset,
            "build_fresh": choice == FRESH,
            "auto_promote": data["auto_promote"],
            "hyperparameters": {name: data.get(name) for name in FORM_SETTINGS},
        }


class PromoteForm(forms.Form):
    reason = forms.CharField(
        required=False,
        widget=forms.Textarea(attrs={"rows": 3, "cols": 80}),
        help_text="Required to promote over a failed gate; recorded with your name.",
    )


class RollbackForm(forms.Form):
    reason = forms.CharField(required=False, widget=forms.TextInput(attrs={"size": 60}))
