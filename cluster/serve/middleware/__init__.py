"""ASGI middleware of the HTTP front that answers before any route runs: API keys (auth.py) and
slow / abusive clients (request_guard.py)."""
