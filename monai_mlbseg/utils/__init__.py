"""Small shared utilities: atomic file output and user-facing input errors."""

from .errors import InputError, Problem
from .io import atomic_path, atomic_torch_save, atomic_write_json, atomic_write_text, run_fingerprint

__all__ = [
    "InputError",
    "Problem",
    "atomic_path",
    "atomic_torch_save",
    "atomic_write_json",
    "atomic_write_text",
    "run_fingerprint",
]
