"""The agents' workspace: queue entries, richer reviews, and training candidates awaiting approval.

Data steps: existing reviews keep their meaning (a rejected one is "bad"); each reply's
latest approving or correcting review becomes a *pending* training candidate, so the
feedback collected before approval existed is kept, but reaches training only once a
model admin approves it.
"""

import django.db.models.deletion
import django.utils.timezone
from django.conf import settings
from django.db import migrations, models


def existing_reviews_forward(apps, schema_editor):
    Review = apps.get_model("conversations", "Review")
    TrainingCandidate = apps.get_model("conversations", "TrainingCandidate")
    Review.objects.filter(verdict="rejected").update(good=False)
    latest: dict[int, object] = {}
    for review in Review.objects.select_related("message").order_by("message_id", "created_at", "id").iterator():
        latest[review.message_id] = review
    for review in latest.values():
        message = review.message
        if review.verdict == "rejected" or message.role != "bot" or message.status != "complete":
            continue
        corrected = review.verdict == "corrected"
        TrainingCandidate.objects.create(
            message=message,
            review=review,
            kind="correction" if corrected else "approved_reply",
            text=review.corrected_body if corrected else message.body,
            model_version_id=review.model_version_id or message.model_version_id,
            reviewer_id=review.reviewer_id,
            created_at=review.created_at,
        )


class Migration(migrations.Migration):

    dependencies = [
        ('conversations', '0002_one_open_conversation'),
        ('finetune', '0001_initial'),
        migrations.swappable_dependency(settings.AUTH_USER_MODEL),
    ]

    operations = [
        migrations.CreateModel(
            name='TrainingCandidate',
            fields=[
                ('id', models.BigAutoField(auto_created=True, primary_key=True, serialize=False, verbose_name='ID')),
                ('kind', models.CharField(choices=[('approved_reply', 'Approved reply'), ('correction', 'Correction')], max_length=16)),
                ('text', models.TextField(help_text="The reply to learn: the correction, or the bot's reply as written.")),
                ('status', models.CharField(choices=[('pending', 'Pending approval'), ('approved', 'Approved for training'), ('rejected', 'Rejected'), ('superseded', 'Superseded by a later review')], default='pending', max_length=16)),
                ('decided_at', models.DateTimeField(blank=True, null=True)),
                ('decision_note', models.CharField(blank=True, max_length=500)),
                ('created_at', models.DateTimeField(default=django.utils.timezone.now)),
            ],
            options={
                'ordering': ['created_at', 'id'],
                'permissions': [('approve_trainingcandidate', 'Can approve corrections and replies for training')],
            },
        ),
        migrations.AddField(
            model_name='conversation',
            name='agent_display_name',
            field=models.CharField(blank=True, help_text='Name the customer sees for the agent who has the conversation.', max_length=150),
        ),
        migrations.AddField(
            model_name='review',
            name='context',
            field=models.JSONField(blank=True, default=dict, help_text='What the reviewer saw of the reply.'),
        ),
        migrations.AddField(
            model_name='review',
            name='good',
            field=models.BooleanField(default=True, help_text="The reviewer's good/bad call."),
        ),
        migrations.AddField(
            model_name='review',
            name='reasons',
            field=models.JSONField(blank=True, default=list, help_text='Reported reasons (Review.Reason values).'),
        ),
        migrations.AlterField(
            model_name='review',
            name='comment',
            field=models.TextField(blank=True, help_text="The reviewer's note."),
        ),
        migrations.CreateModel(
            name='QueueItem',
            fields=[
                ('id', models.BigAutoField(auto_created=True, primary_key=True, serialize=False, verbose_name='ID')),
                ('kind', models.CharField(choices=[('reply', 'Bot reply'), ('conversation', 'Conversation')], default='reply', max_length=16)),
                ('source', models.CharField(choices=[('handoff', 'Waiting for a human'), ('not_helpful', 'Customer said not helpful'), ('low_confidence', 'Low confidence'), ('flagged', 'Flagged'), ('sample', 'Random sample')], max_length=24)),
                ('slot', models.PositiveSmallIntegerField(default=1, help_text='2: the second, independent review of a reply.')),
                ('state', models.CharField(choices=[('pending', 'Pending'), ('draft', 'Draft'), ('submitted', 'Submitted'), ('discarded', 'Discarded')], default='pending', max_length=16)),
                ('claimed_at', models.DateTimeField(blank=True, null=True)),
                ('lease_expires_at', models.DateTimeField(blank=True, null=True)),
                ('draft', models.JSONField(blank=True, default=dict, help_text='Review values saved but not submitted.')),
                ('note', models.CharField(blank=True, help_text="Why it was queued (the flag's note, the handoff).", max_length=500)),
                ('intent', models.CharField(blank=True, max_length=64)),
                ('segment', models.CharField(blank=True, max_length=64)),
                ('created_at', models.DateTimeField(default=django.utils.timezone.now)),
                ('resolved_at', models.DateTimeField(blank=True, null=True)),
                ('resolution', models.CharField(blank=True, help_text='reviewed, reviewed_elsewhere, taken_over, closed, discarded…', max_length=32)),
                ('added_by', models.ForeignKey(blank=True, null=True, on_delete=django.db.models.deletion.SET_NULL, related_name='+', to=settings.AUTH_USER_MODEL)),
                ('claimed_by', models.ForeignKey(blank=True, null=True, on_delete=django.db.models.deletion.SET_NULL, related_name='+', to=settings.AUTH_USER_MODEL)),
                ('conversation', models.ForeignKey(on_delete=django.db.models.deletion.CASCADE, related_name='queue_items', to='conversations.conversation')),
                ('draft_by', models.ForeignKey(blank=True, null=True, on_delete=django.db.models.deletion.SET_NULL, related_name='+', to=settings.AUTH_USER_MODEL)),
                ('message', models.ForeignKey(blank=True, help_text='The bot reply.', null=True, on_delete=django.db.models.deletion.CASCADE, related_name='queue_items', to='conversations.message')),
                ('model_version', models.ForeignKey(blank=True, null=True, on_delete=django.db.models.deletion.SET_NULL, related_name='+', to='finetune.modelversion')),
                ('resolved_by', models.ForeignKey(blank=True, null=True, on_delete=django.db.models.deletion.SET_NULL, related_name='+', to=settings.AUTH_USER_MODEL)),
            ],
            options={
                'ordering': ['created_at', 'id'],
            },
        ),
        migrations.AddField(
            model_name='review',
            name='item',
            field=models.ForeignKey(blank=True, help_text='Queue entry.', null=True, on_delete=django.db.models.deletion.SET_NULL, related_name='reviews', to='conversations.queueitem'),
        ),
        migrations.AddIndex(
            model_name='review',
            index=models.Index(fields=['message', '-created_at', '-id'], name='review_latest_idx'),
        ),
        migrations.AddIndex(
            model_name='review',
            index=models.Index(fields=['reviewer', 'created_at'], name='review_reviewer_time_idx'),
        ),
        migrations.AddField(
            model_name='trainingcandidate',
            name='decided_by',
            field=models.ForeignKey(blank=True, null=True, on_delete=django.db.models.deletion.SET_NULL, related_name='+', to=settings.AUTH_USER_MODEL),
        ),
        migrations.AddField(
            model_name='trainingcandidate',
            name='message',
            field=models.ForeignKey(on_delete=django.db.models.deletion.CASCADE, related_name='training_candidates', to='conversations.message'),
        ),
        migrations.AddField(
            model_name='trainingcandidate',
            name='model_version',
            field=models.ForeignKey(blank=True, null=True, on_delete=django.db.models.deletion.PROTECT, related_name='+', to='finetune.modelversion'),
        ),
        migrations.AddField(
            model_name='trainingcandidate',
            name='review',
            field=models.OneToOneField(on_delete=django.db.models.deletion.PROTECT, related_name='training_candidate', to='conversations.review'),
        ),
        migrations.AddField(
            model_name='trainingcandidate',
            name='reviewer',
            field=models.ForeignKey(on_delete=django.db.models.deletion.PROTECT, related_name='+', to=settings.AUTH_USER_MODEL),
        ),
        migrations.AddIndex(
            model_name='queueitem',
            index=models.Index(fields=['state', 'source', 'created_at', 'id'], name='queueitem_fifo_idx'),
        ),
        migrations.AddIndex(
            model_name='queueitem',
            index=models.Index(fields=['state', 'created_at', 'id'], name='queueitem_open_idx'),
        ),
        migrations.AddConstraint(
            model_name='queueitem',
            constraint=models.UniqueConstraint(condition=models.Q(('message__isnull', False)), fields=('message', 'source', 'slot'), name='queueitem_once_per_reply_source_slot'),
        ),
        migrations.AddConstraint(
            model_name='queueitem',
            constraint=models.UniqueConstraint(condition=models.Q(('kind', 'conversation'), ('state__in', ['pending', 'draft'])), fields=('conversation',), name='queueitem_one_open_handoff_per_conversation'),
        ),
        migrations.AddConstraint(
            model_name='queueitem',
            constraint=models.CheckConstraint(condition=models.Q(models.Q(('kind', 'reply'), ('message__isnull', False)), models.Q(('kind', 'conversation'), ('message__isnull', True)), _connector='OR'), name='queueitem_reply_has_message'),
        ),
        migrations.AddConstraint(
            model_name='queueitem',
            constraint=models.CheckConstraint(condition=models.Q(('slot__in', [1, 2])), name='queueitem_slot_1_or_2'),
        ),
        migrations.AddIndex(
            model_name='trainingcandidate',
            index=models.Index(fields=['status', 'created_at'], name='trainingcandidate_status_idx'),
        ),
        migrations.AddConstraint(
            model_name='trainingcandidate',
            constraint=models.UniqueConstraint(condition=models.Q(('status__in', ['pending', 'approved'])), fields=('message',), name='trainingcandidate_one_live_per_reply'),
        ),
        migrations.RunPython(existing_reviews_forward, migrations.RunPython.noop),
    ]
