"""The record store: one typed, versioned record per run folder, ONE atomic writer
(:mod:`.io`), one reader (:func:`.record.read_record` / :func:`.query.iter_records`), the
model files and the example-image channel.  Nothing here imports the harness above it."""

from .io import (
                 atomic_write,
                 atomic_write_bytes,
                 atomic_write_text,
                 load_tensors,
                 read_tensor_meta,
                 save_npz_atomic,
                 save_tensors_atomic,
                 write_json,
)
from .query import CACHE_DIR, StoreIssues, iter_records
from .record import (
                 EXAMPLES,
                 MODEL,
                 PER_EXAMPLE,
                 RECORD,
                 SCHEMA_VERSION,
                 RunRecord,
                 problems,
                 read_record,
                 upgrade,
                 versions,
)

__all__ = [
                 "CACHE_DIR",
                 "EXAMPLES",
                 "MODEL",
                 "PER_EXAMPLE",
                 "RECORD",
                 "SCHEMA_VERSION",
                 "RunRecord",
                 "StoreIssues",
                 "atomic_write",
                 "atomic_write_bytes",
                 "atomic_write_text",
                 "iter_records",
                 "load_tensors",
                 "problems",
                 "read_record",
                 "read_tensor_meta",
                 "save_npz_atomic",
                 "save_tensors_atomic",
                 "upgrade",
                 "versions",
                 "write_json",
]
