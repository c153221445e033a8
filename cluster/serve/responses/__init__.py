"""OpenAI's Responses API (/v1/responses) over the chat path: wire models (protocol), input items
and stored turns as chat messages (conversation), the bounded store of past responses (store),
create / stream / retrieve / delete as the server half's pieces (service); the ingress's routes
(cluster/serve/ingress/http_app.py) hand them over like the other routes."""
