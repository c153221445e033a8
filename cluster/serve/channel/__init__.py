"""The piece channel: how an attention replica's pieces reach the ingress that asked for them. One
authenticated TCP connection per (ingress replica, attention replica) pair, opened by the replica on
its first request from that ingress, carries every piece of every request between them, a step's
worth per frame (wire.py). The ingress listens (inbox.py) and hands each piece to its request's
mailbox; the replica batches (outbox.py). Serve handle calls stay for routing, admission, cancel and
the replica's death."""
