import json

from django.contrib.auth import authenticate, login
from django.http import HttpResponse, JsonResponse
from django.views.decorators.csrf import csrf_exempt


def show_session(request):
    s = request.session
    return JsonResponse({
        "key": s.session_key,
        "data": {k: s[k] for k in s.keys()},
        "expiry_age": s.get_expiry_age(),
        "expire_at_browser_close": s.get_expire_at_browser_close(),
        "user": request.user.username if request.user.is_authenticated else None,
    })


@csrf_exempt
def login_view(request):
    user = authenticate(request, username=request.POST["username"],
                        password=request.POST["password"])
    if user is None:
        return HttpResponse("bad login", status=403)
    login(request, user)
    return HttpResponse("ok")


@csrf_exempt
def set_keys(request):
    request.session.update(json.loads(request.body))
    return HttpResponse("ok")


def flush(request):
    request.session.flush()
    return HttpResponse("ok")


def cycle(request):
    request.session.cycle_key()
    return HttpResponse("ok")


def expiry(request):
    v = request.GET["v"]
    request.session.set_expiry(int(v) if v.lstrip("-").isdigit() else v)
    return HttpResponse("ok")
