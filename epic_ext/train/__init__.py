"""EPIC training: progressive consistency distillation schedules, losses, trainer and data.

``schedules``: pure functions of training progress that say, for each step, how strongly the
student and the (milder) teacher compress the visual tokens, and how to weight the KL term.
"""
