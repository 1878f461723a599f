"""Small shared utilities: atomic file output, user-facing input errors and network unwrapping."""

from .errors import DEBUG_ENV, INPUT_ERROR_STATUS, InputError, Problem, exit_on_input_error, find_input_error
from .io import atomic_path, atomic_torch_save, atomic_write_json, atomic_write_text, run_fingerprint
from .network import unwrap_network

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
    "unwrap_network",
]
