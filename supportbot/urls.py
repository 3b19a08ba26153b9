"""URL routes. Websocket routes live in ``supportbot/asgi.py`` via ``conversations.routing``."""

from django.contrib import admin
from django.urls import include, path

from . import views

admin.site.site_header = "SupportBot administration"
admin.site.site_title = "SupportBot admin"
admin.site.index_title = "Tickets, training, model versions and conversations"

urlpatterns = [
    path("", views.home, name="home"),
    path("healthz", views.healthz, name="healthz"),
    path("admin/", admin.site.urls),
    path("agent/", include("workspace.urls")),
    path("", include("conversations.urls")),
]
