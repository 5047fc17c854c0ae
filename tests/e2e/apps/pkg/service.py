from asgi_app import app as asgi

web = asgi
