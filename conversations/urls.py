"""HTTP routes of the chat and the review console."""

urlpatterns: list = []
