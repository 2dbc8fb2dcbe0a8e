"""Client logic (local split training) and device entry points."""

import os

# Split training alternates between two processes (client, server) on the same cores.
# OpenMP's default spin-wait keeps a process's idle worker threads busy for a while after
# each parallel region, stealing the cores the *other* process needs right then: on 2
# cores that made a Ray-simulated MiniLM client 2.3x slower. Passive waiting fixes it.
# It must be set before torch is imported, hence here (users can still override it).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
