"""Peers' stale checkpoints as teachers.

- loader.py: a reader thread per peer reads and checks its exports beside the training loop.
- pool.py: the teacher modules of one rank (TeacherPool): load, forward, soft targets.
- placement.py: where a teacher's weights live (whole, ZeRO-3 partitioned, host-offloaded).
- health.py: guards that keep a bad peer from poisoning the students (TeacherGuard).
"""
