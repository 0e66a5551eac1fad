"""The study database: URLs, engines, hybridlab's tables and queries, study and trial lookup.

Search, evaluation, export and the dashboard all import this package; it imports none of them.
"""

from hybridlab.store.engine import (
    SQLITE_BUSY_TIMEOUT_S,
    StorageError,
    create_tables,
    default_sqlite_url,
    display_url,
    engine_kwargs,
    is_sqlite,
    make_engine,
    open_engine,
    readonly_engine_kwargs,
    readonly_url,
    require_database,
    session_scope,
    sqlite_path,
    worker_id,
)
from hybridlab.store.models import (
    CHECKPOINT_KIND,
    NOTED,
    SCHEMA_VERSION,
    WITH_WEIGHTS,
    Artifact,
    Base,
    Candidate,
    CandidateStatus,
    CurvePoint,
    Evaluation,
    SchemaVersion,
    Slot,
)
from hybridlab.store.studies import (
    TrialWeights,
    best_trials,
    load_study,
    optuna_storage,
    resolve_study,
    set_trial_user_attrs,
    study_names,
    top_trials,
    trial_weights,
)

__all__ = [
    "CHECKPOINT_KIND", "NOTED", "SCHEMA_VERSION", "SQLITE_BUSY_TIMEOUT_S", "WITH_WEIGHTS",
    "Artifact", "Base", "Candidate", "CandidateStatus", "CurvePoint", "Evaluation",
    "SchemaVersion", "Slot", "StorageError", "TrialWeights", "best_trials", "create_tables",
    "default_sqlite_url", "display_url", "engine_kwargs", "is_sqlite", "load_study",
    "make_engine", "open_engine", "optuna_storage", "readonly_engine_kwargs", "readonly_url",
    "require_database", "resolve_study", "session_scope", "set_trial_user_attrs", "sqlite_path",
    "study_names", "top_trials", "trial_weights", "worker_id",
]
