"""Segment labels on messages (register, registers, language, segmenter version, intent) and the
``ReplyOutcome`` table the monitoring dashboard aggregates.

Schema only: labelling existing messages runs the register detector over their text, which
can take minutes on a large table, so it is a command, not a migration step:
``manage.py monitoring_backfill`` (safe to run again, and while the chat is live).
"""

import django.db.models.deletion
from django.db import migrations, models


class Migration(migrations.Migration):

    dependencies = [
        ('conversations', '0004_botprofile_facts_message_grounding'),
        ('finetune', '0001_initial'),
    ]

    operations = [
        migrations.AddField(
            model_name='message',
            name='intent',
            field=models.CharField(blank=True, help_text="Intent when known: a bot reply's, and the message it answered.", max_length=64),
        ),
        migrations.AddField(
            model_name='message',
            name='language',
            field=models.CharField(blank=True, help_text="ISO 639-1 code, 'und' when too short to tell.", max_length=8),
        ),
        migrations.AddField(
            model_name='message',
            name='register',
            field=models.CharField(blank=True, help_text='Primary language register (customer messages).', max_length=16),
        ),
        migrations.AddField(
            model_name='message',
            name='registers',
            field=models.JSONField(blank=True, default=list, help_text="Every register that applies, or ['plain']."),
        ),
        migrations.AddField(
            model_name='message',
            name='segmenter_version',
            field=models.PositiveSmallIntegerField(blank=True, null=True),
        ),
        migrations.CreateModel(
            name='ReplyOutcome',
            fields=[
                ('message', models.OneToOneField(on_delete=django.db.models.deletion.CASCADE, primary_key=True, related_name='outcome', serialize=False, to='conversations.message')),
                ('created_at', models.DateTimeField(help_text='When the reply was written.')),
                ('register', models.CharField(blank=True, max_length=16)),
                ('reg_plain', models.BooleanField(default=False)),
                ('reg_polite', models.BooleanField(default=False)),
                ('reg_colloquial', models.BooleanField(default=False)),
                ('reg_typos', models.BooleanField(default=False)),
                ('reg_offensive', models.BooleanField(default=False)),
                ('reg_keyword_only', models.BooleanField(default=False)),
                ('language', models.CharField(blank=True, max_length=8)),
                ('page_segment', models.CharField(blank=True, max_length=64)),
                ('intent', models.CharField(blank=True, max_length=64)),
                ('reply_words', models.PositiveIntegerField(default=0)),
                ('latency_ms', models.PositiveIntegerField(blank=True, null=True)),
                ('helpful', models.BooleanField(blank=True, null=True)),
                ('handoff', models.BooleanField(default=False, help_text='The conversation went to a human before the next reply.')),
                ('reviewed', models.BooleanField(default=False)),
                ('bad', models.BooleanField(blank=True, help_text='The latest review called it bad.', null=True)),
                ('rating', models.PositiveSmallIntegerField(blank=True, null=True)),
                ('corrected', models.BooleanField(blank=True, null=True)),
                ('reason_incorrect', models.BooleanField(blank=True, null=True)),
                ('reason_inappropriate', models.BooleanField(blank=True, null=True)),
                ('reason_incomplete', models.BooleanField(blank=True, null=True)),
                ('reason_outdated', models.BooleanField(blank=True, null=True)),
                ('reason_personal_data', models.BooleanField(blank=True, null=True)),
                ('reason_biased', models.BooleanField(blank=True, null=True)),
                ('reason_other', models.BooleanField(blank=True, null=True)),
                ('updated_at', models.DateTimeField(auto_now=True, db_index=True)),
                ('model_version', models.ForeignKey(blank=True, null=True, on_delete=django.db.models.deletion.PROTECT, related_name='+', to='finetune.modelversion')),
            ],
            options={
                'ordering': ['-created_at'],
                'indexes': [models.Index(fields=['model_version', 'created_at'], name='replyoutcome_version_time_idx')],
            },
        ),
    ]
