import os

# Two cores: idle OpenMP threads must sleep rather than spin, or parallel test processes starve each other.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
