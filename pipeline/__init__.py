"""modelbuild: recipe-driven quantization and model builds for LLMs.

Importing the package defines names only: no logging set-up, no torch, no environment changes.
"""

__version__ = "0.1.0"
