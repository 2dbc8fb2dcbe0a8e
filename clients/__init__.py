"""Client logic (local split training) and device entry points."""
