"""Forms of the fine-tuning admin pages: the "Retrain now" form and the promotion form.

They only parse input; the services decide what is allowed (ranges, one live run,
gates) and their ApplicationError messages are shown on the form.
"""

from __future__ import annotations

from django import forms

from .models import DatasetVersion
from .training import TrainConfig

LATEST = "latest"
FRESH = "fresh"


class RetrainForm(forms.Form):
    dataset = forms.ChoiceField(label="Dataset", help_text="Train on an existing dataset version or build a new one.")
    epochs = forms.FloatField(initial=TrainConfig.epochs, help_text="Passes over the training data (1-3 is usual).")
    learning_rate = forms.FloatField(initial=TrainConfig.learning_rate, help_text="LoRA's usual range is 1e-4 to 3e-4.")
    lora_r = forms.IntegerField(label="LoRA rank", initial=TrainConfig.lora_r, help_text="Adapter rank r (8-32).")
    max_examples = forms.IntegerField(
        required=False, min_value=1, help_text="Train on a sample of this many examples; blank: all of them."
    )
    auto_promote = forms.BooleanField(
        required=False,
        initial=True,
        label="Promote automatically if it passes the gates",
        help_text="Otherwise the new version waits as a candidate for someone to promote it.",
    )

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        versions = list(DatasetVersion.objects.order_by("-created_at", "-id")[:50])
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
            "hyperparameters": {
                "epochs": data["epochs"],
                "learning_rate": data["learning_rate"],
                "lora_r": data["lora_r"],
                "max_examples": data.get("max_examples"),
            },
        }


class PromoteForm(forms.Form):
    reason = forms.CharField(
        required=False,
        widget=forms.Textarea(attrs={"rows": 3, "cols": 80}),
        help_text="Required to promote over a failed gate; recorded with your name.",
    )


class RollbackForm(forms.Form):
    reason = forms.CharField(required=False, widget=forms.TextInput(attrs={"size": 60}))
