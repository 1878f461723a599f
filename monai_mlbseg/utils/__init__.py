"""Small shared utilities: atomic file output and user-facing input errors."""

from .errors import DEBUG_ENV, INPUT_ERROR_STATUS, InputError, Problem, exit_on_input_error, find_input_error
from .io import atomic_path, atomic_torch_save, atomic_write_json, atomic_write_text, run_fingerprint

__all__ = [
    "DEBUG_ENV",
    "INPUT_ERROR_STATUS",
    "InputError",
    "Problem",
    "atomic_path",
    "atomic_torch_save",
    "atomic_write_json",
    "atomic_write_text",
    "exit_on_input_error",
    "find_input_error",
    "run_fingerprint",
]
