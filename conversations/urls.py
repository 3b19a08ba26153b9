"""HTTP routes of the chat (the agents' workspace has its own: ``workspace/urls.py``)."""

from django.urls import path

from . import views

urlpatterns = [
    path("chat/", views.chat_page, name="chat"),
    path("chat/embed/", views.chat_embed, name="chat-embed"),
    path("chat/session/", views.chat_session, name="chat-session"),
]
