from django.urls import path

import views

urlpatterns = [
    path("new/session", views.show_session),
    path("new/login", views.login_view),
    path("new/set", views.set_keys),
    path("new/flush", views.flush),
    path("new/cycle", views.cycle),
    path("new/expiry", views.expiry),
]
