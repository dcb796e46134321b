"""The commands a user runs (diagnose, verify, rank, demo), built on the engine below them.

Layers, bottom up: the engine (``curvature``, ``params``, ``geometry``, ``forecast``, ``data``,
``models``, ``memory``, ``evaluate``), the training side (``train``: loop, tracker, watcher,
guards), the commands here, and the front ends (``cli``, ``report``). A module imports only
from its own layer or those below it.
"""
