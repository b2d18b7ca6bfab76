"""The record store: one typed, versioned record per run folder, ONE atomic writer
(:mod:`.io`), one reader (:func:`.record.read_record` / :func:`.query.iter_records`), the
model files and the example-image channel.  Nothing here imports the harness above it."""

from .io import (atomic_write, atomic_write_bytes, atomic_write_text, load_tensors, read_tensor_meta,
                 save_npz_atomic, save_tensors_atomic, write_json)
from .record import EXAMPLES, MODEL, RECORD, SCHEMA_VERSION, RunRecord, problems, read_record, upgrade, versions
from .query import CACHE_DIR, StoreIssues, iter_records

__all__ = [
    "atomic_write", "atomic_write_bytes", "atomic_write_text", "load_tensors", "read_tensor_meta",
    "save_npz_atomic", "save_tensors_atomic", "write_json", "EXAMPLES", "MODEL", "RECORD", "SCHEMA_VERSION",
    "RunRecord", "problems", "read_record", "upgrade", "versions", "CACHE_DIR", "StoreIssues", "iter_records",
]
