"""The test session is an entry point like fedvb's CLI: one torch thread, so in-process runs compute
exactly what the CLI, Ray actors and sweep workers (each pinned to one thread) compute."""

import torch

torch.set_num_threads(1)


def pytest_sessionfinish(session, exitstatus):
    """Stop fedvb's in-process worker pools while the interpreter is whole (not from atexit during its
    teardown), and name the threads still running then: a crash at exit (seen once in CI as a segfault in a
    thread after every test had passed) would point at one of them."""
    import threading

    from fedvb.workers import close_pools

    close_pools()
    alive = [t.name for t in threading.enumerate() if t is not threading.main_thread()]
    if alive:
        print(f"\nthreads still running at the end of the session: {', '.join(alive)}")
