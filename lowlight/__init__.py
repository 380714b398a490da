"""lowlight: face analysis that keeps working in bad light (JAX/Flax).

Subpackages are imported lazily by their users; `import lowlight` stays cheap so that grain
worker processes and command-line tools start fast.
"""

__version__ = "0.1.0"
