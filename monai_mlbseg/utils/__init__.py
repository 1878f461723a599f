"""Small shared utilities: atomic file output, user-facing input errors network unwrapping and
named profiler ranges."""

from .errors import DEBUG_ENV, INPUT_ERROR_STATUS, InputError, Problem, exit_on_input_error, find_input_error
from .io import (
    DIGEST_SUFFIX,
    atomic_path,
    atomic_torch_save,
    atomic_write_json,
    atomic_write_text,
    describe_settings,
    digest_path,
    digest_problem,
    file_digest,
    read_user_text,
    recorded_source,
    run_fingerprint,
    write_digest,
)
from .lock import LOCK_FILE, lock_folder, release_folder
from .manifest import DIGEST_CACHE_FILE, MANIFEST_FILE, DataManifest
from .network import unwrap_network
from .profiling import SCOPE_PREFIX, profiled

__all__ = [
    "DataManifest",
    "DIGEST_CACHE_FILE",
    "MANIFEST_FILE",
    "recorded_source",
    "DEBUG_ENV",
    "DIGEST_SUFFIX",
    "LOCK_FILE",
    "digest_path",
    "digest_problem",
    "file_digest",
    "lock_folder",
    "release_folder",
    "write_digest",
    "INPUT_ERROR_STATUS",
    "SCOPE_PREFIX",
    "InputError",
    "Problem",
    "atomic_path",
    "atomic_torch_save",
    "atomic_write_json",
    "atomic_write_text",
    "describe_settings",
    "read_user_text",
    "exit_on_input_error",
    "find_input_error",
    "profiled",
    "run_fingerprint",
    "unwrap_network",
]
