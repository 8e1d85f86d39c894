"""The test session is an entry point like fedvb's CLI: one torch thread, so in-process runs compute
exactly what the CLI, Ray actors and sweep workers (each pinned to one thread) compute."""

import torch

torch.set_num_threads(1)
