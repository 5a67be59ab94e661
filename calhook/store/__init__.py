"""The store: calhook's Redis layout and every transition of its state, in one place.

``keys`` declares each key, ``lua/`` holds the scripts (one transition each), ``scripts`` loads
them, and each store reads or changes one part: ``pairs`` (events and their pairs), ``records``
(dead letters and parked events), ``trail``, ``stats``, ``queues``. The ingress and the workers
both import it; it imports neither.
"""
