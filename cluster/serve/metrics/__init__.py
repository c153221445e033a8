"""Prometheus metrics of one attention replica, rendered at its /metrics route: the families
(replica.py), each request's latencies from its arrival (request_timer.py), and what is read from
the engine and the expert data plane at scrape time (scraped.py)."""
