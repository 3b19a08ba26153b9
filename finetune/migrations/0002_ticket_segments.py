"""Register labels on historical tickets (from their Bitext tags, else the detector).

Schema only; ``manage.py monitoring_backfill`` labels tickets imported before this.
"""

from django.db import migrations, models


class Migration(migrations.Migration):

    dependencies = [
        ('finetune', '0001_initial'),
    ]

    operations = [
        migrations.AddField(
            model_name='ticket',
            name='register',
            field=models.CharField(blank=True, help_text='Primary register (offensive, typos, …, plain).', max_length=16),
        ),
        migrations.AddField(
            model_name='ticket',
            name='register_source',
            field=models.CharField(blank=True, help_text="'tags' (the source's own register tags) or 'detector'.", max_length=16),
        ),
        migrations.AddField(
            model_name='ticket',
            name='registers',
            field=models.JSONField(blank=True, default=list, help_text="Every register that applies, or ['plain']."),
        ),
        migrations.AddField(
            model_name='ticket',
            name='segmenter_version',
            field=models.PositiveSmallIntegerField(blank=True, null=True),
        ),
    ]
