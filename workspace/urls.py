"""HTTP routes of the agents' workspace, all under ``/agent/``."""

from django.urls import path

from . import views

app_name = "workspace"

urlpatterns = [
    path("", views.queue_page, name="queue"),
    path("next/", views.queue_next, name="next"),
    path("items/<int:item_id>/", views.item_page, name="item"),
    path("items/<int:item_id>/claim/", views.item_claim, name="item-claim"),
    path("items/<int:item_id>/release/", views.item_release, name="item-release"),
    path("items/<int:item_id>/review/", views.item_review, name="item-review"),
    path("items/<int:item_id>/previous/", views.item_previous, name="item-previous"),
    path("messages/<int:message_id>/flag/", views.message_flag, name="message-flag"),
    path("conversations/", views.conversation_list, name="conversations"),
    path("conversations/<uuid:conversation_id>/", views.conversation_page, name="conversation"),
    path("conversations/<uuid:conversation_id>/take-over/", views.conversation_take_over, name="take-over"),
    path("conversations/<uuid:conversation_id>/hand-back/", views.conversation_hand_back, name="hand-back"),
    path("conversations/<uuid:conversation_id>/close/", views.conversation_close, name="close"),
    path("conversations/<uuid:conversation_id>/send/", views.conversation_send, name="send"),
    path("stats/", views.stats_page, name="stats"),
    path("training/", views.training_page, name="training"),
    path("training/decide/", views.training_decide, name="training-decide"),
    path("export/", views.export_download, name="export"),
    path("monitoring/", views.monitoring_page, name="monitoring"),
    path("monitoring/figures.csv", views.monitoring_csv, name="monitoring-csv"),
]
