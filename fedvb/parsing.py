"""One lock for the work of fedvb's client threads that builds Python AST objects.

CPython 3.11 converts a parsed tree to Python objects with interpreter-wide state that is not thread-safe
(python/cpython gh-106905): two threads parsing at once can fail with "SystemError: AST constructor recursion
depth mismatch" (seen in CI: a client of the vectorised engine answered it). Two such parses happen in client
threads: numpy reads each array's ``.npy`` header with ``ast.literal_eval`` (Flower's ``Array.numpy``, so every
record decoded), and traceback formatting parses source lines for its caret anchors (an error reply). Both hold
:data:`PARSING`; both are short next to a client's training.
"""

from __future__ import annotations

import threading

__all__ = ["PARSING"]

PARSING = threading.Lock()
