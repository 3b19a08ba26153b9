#!/usr/bin/env python
"""Django's command-line utility for SupportBot (``python manage.py help`` lists the commands)."""

import os
import sys

# Before anything imports torch: OpenMP threads that spin-wait at every barrier burn the
# CPU time their busy siblings need whenever another process shares the cores (the
# finetune command beside daphne and a worker: 2.7x less CPU per token with PASSIVE,
# docs/quality-research.md).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def main() -> None:
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "supportbot.settings")
    from django.core.management import execute_from_command_line

    execute_from_command_line(sys.argv)


if __name__ == "__main__":
    main()
