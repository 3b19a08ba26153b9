"""Small display helpers shared by the fine-tuning admin pages."""

from __future__ import annotations

import json

from django.utils.html import format_html

RETRAIN_PERMISSION = "finetune.retrain_model"
PROMOTE_PERMISSION = "finetune.promote_modelversion"


def pretty_json(value) -> str:
    if not value:
        return "—"
    return format_html("<pre class='sb-json'>{}</pre>", json.dumps(value, indent=2, ensure_ascii=False, default=str))
